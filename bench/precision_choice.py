"""Is x86's precision choice (7-bit x 8-bit vs 8-bit x 7-bit, fxq.precision) reliable on 32
held-out samples? For each model, quantize with each split alone, then compare the SQNR each
gets on 32 held-out images with the SQNR on 128 fresh ones: the choice is reliable when the
better split on the held-out set is the better one on the fresh set.

    python bench/precision_choice.py mobilenet_v3_small,vgg11_bn,efficientnet_b0 64
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxq  # noqa: E402
from bench.harness import ModelSpec, prepare_model, random_batches  # noqa: E402
from fxq.tensors import sqnr_db  # noqa: E402


def main(names: list[str], image_size: int) -> None:
    x86 = fxq.get_backend("x86")
    if not x86.alternatives:
        sys.exit("this CPU has VNNI: x86 has one precision split, nothing to choose")
    splits = [dataclasses.replace(split, max_product_bits=None) for split in (x86, *x86.alternatives)]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in names:
        spec = ModelSpec(name, "classification")
        model = prepare_model(spec, image_size, 4)
        calibration = random_batches(spec, 12, 8, image_size, 1)  # 96 images
        held_out = random_batches(spec, 4, 8, image_size, 2)      # 32
        fresh = random_batches(spec, 8, 16, image_size, 3)        # 128
        with torch.no_grad():
            held_ref, fresh_ref = [model(*x) for x in held_out], [model(*x) for x in fresh]
            scores = []
            for split in splits:
                qmodel = fxq.quantize(model, calibration[0], calibration, backend=split)
                scores.append((sqnr_db(held_ref, [qmodel(*x) for x in held_out]),
                               sqnr_db(fresh_ref, [qmodel(*x) for x in fresh])))
        agree = (scores[0][0] >= scores[1][0]) == (scores[0][1] >= scores[1][1])
        print(f"{name:20s} held out {scores[0][0]:.2f} / {scores[1][0]:.2f} dB | fresh {scores[0][1]:.2f} / "
              f"{scores[1][1]:.2f} dB ({splits[0].precision} / {splits[1].precision}) | same pick: {agree}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 64)
