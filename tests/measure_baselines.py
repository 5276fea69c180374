"""How far plain torch.ao FX int8 gets on each fixture: the baseline fxq must beat.

Run as ``python tests/measure_baselines.py [name ...]``; not a test. For every seed model and
every ZOO_SMOKE model it prints the stage plain FX failed at (or "ok"), the error, the SQNR of
the int8 model against fp32 on fresh inputs, and how long building, a float forward and plain
FX quantization took.
"""

import sys
import time
import warnings

import torch

from metrics import sqnr_db
from seed_models import SEED_MODELS
from zoo import ZOO_SMOKE, PlainFxError, make_zoo_model, plain_fx_int8

NUM_FRESH_BATCHES = 4
ERROR_WIDTH = 90


def _fresh_inputs(sample) -> list:
    generator_state = torch.get_rng_state()
    torch.manual_seed(1234)
    batches = [sample() for _ in range(NUM_FRESH_BATCHES)]
    torch.set_rng_state(generator_state)
    return batches


def _outputs(model, batches: list) -> list:
    with torch.no_grad():
        return [model(*inputs) for inputs in batches]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 3] + "..."


def _plain_fx_outcome(fixture, fresh: list, reference: list) -> dict:
    try:
        int8_model = plain_fx_int8(*fixture)
    except PlainFxError as error:
        return {"stage": error.stage, "error": _one_line(error.__cause__), "sqnr": None}
    try:
        actual = _outputs(int8_model, fresh)
    except Exception as error:
        return {"stage": "run", "error": _one_line(error), "sqnr": None}
    return {"stage": "ok", "error": "", "sqnr": sqnr_db(reference, actual)}


def measure(name: str, make_fixture) -> dict:
    start = time.perf_counter()
    fixture = make_fixture()
    built = time.perf_counter()
    fresh = _fresh_inputs(fixture.sample)
    reference = _outputs(fixture.model, fresh)
    ran = time.perf_counter()
    outcome = _plain_fx_outcome(fixture, fresh, reference)
    return {"name": name, "build_s": built - start,
            "forward_ms": 1000 * (ran - built) / NUM_FRESH_BATCHES,
            "int8_s": time.perf_counter() - ran, **outcome}


def _format(row: dict) -> str:
    sqnr = "-" if row["sqnr"] is None else f"{row['sqnr']:.1f}"
    return (f"{row['name']:26s} {row['build_s']:6.2f} {row['forward_ms']:7.1f} "
            f"{row['int8_s']:6.2f} {row['stage']:9s} {sqnr:>6s}  {row['error']}")


def _all_fixtures() -> dict:
    zoo = {name: (lambda name=name: make_zoo_model(name)) for name in ZOO_SMOKE}
    return {**SEED_MODELS, **zoo}


def main(names: list) -> None:
    warnings.simplefilter("ignore")
    # On a shared 2-core machine a second intra-op thread mostly spin-waits: timings swung
    # 5-20x between runs with 2 threads and were steady with 1.
    torch.set_num_threads(1)
    fixtures = _all_fixtures()
    print("failed at: the plain-FX stage that raised (trace/prepare/calibrate/convert/run)")
    print("times: build s (incl. BatchNorm recalibration), fp32 forward ms, plain-FX int8 s "
          "(quantize + the int8 forwards)")
    print(f"{'model':26s} {'build':>6s} {'fwd ms':>7s} {'int8 s':>6s} {'failed at':9s} "
          f"{'SQNR':>6s}  error")
    for name in names or fixtures:
        print(_format(measure(name, fixtures[name])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
