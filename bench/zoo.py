"""Zoo benchmark: plain FX int8 vs fxq int8 vs fp32 on every torchvision (and timm) model.

Each model runs in its own subprocess (``bench/measure.py``) with a timeout; its record is
appended to ``<out>/results.jsonl`` as soon as it is done, so an interrupted run resumes where
it stopped (``--force`` measures again). Then ``bench/report.py`` writes the CSV/JSON and
``docs/benchmarks.md`` with the plot. Examples::

    python bench/zoo.py --subset quick
    python bench/zoo.py --subset classification --threads 1 --runs 30
    python bench/zoo.py --models resnet18,timm:efficientnet_b0 --image-size 128 --force
    python bench/report.py bench/results/results.jsonl      # the report only
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `fxq` importable
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.harness import FAMILIES, TIMM_PREFIX, ModelSpec, torchvision_specs  # noqa: E402
from bench.measure import Settings  # noqa: E402

# A fixed, diverse timm list: depthwise/SE/hardswish mobile nets (several with TF "same"
# padding), ResNet variants with attention and split branches, RegNets, ConvNeXt, hybrid and
# pure transformers, RepVGG/MobileOne-style reparameterised nets, DenseNet/DPN/HRNet topologies.
TIMM_MODELS = [
    "mobilenetv3_large_100", "tf_mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_b0",
    "efficientnet_lite0", "tf_efficientnetv2_b0", "mixnet_s", "mnasnet_100", "fbnetc_100",
    "ghostnet_100", "lcnet_050", "rexnet_100", "resnet18", "resnet50d", "seresnet50",
    "res2net50_26w_4s", "resnest14d", "regnetx_002", "regnety_002", "regnetz_b16", "convnext_atto",
    "convnext_tiny", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "mobilevit_xxs",
    "poolformer_s12", "efficientformer_l1", "repvgg_a2", "ese_vovnet19b_dw", "dla34", "dpn68",
    "cspdarknet53", "hrnet_w18_small", "densenet121", "inception_v3", "xception41", "nfnet_l0",
    "edgenext_xx_small", "fastvit_t8", "gernet_s",
]
# The models the issue quotes plain-FX numbers for, plus a few cheap ones; timm ones when installed.
QUICK = ["resnet18", "resnet50", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
         "densenet121", "convnext_tiny", "vit_b_16"]
QUICK_TIMM = ["mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_b0"]
# Three cheap models for CI's smoke test (tests/test_bench_smoke.py): plain residual, fire
# modules with concat, channel shuffle.
SMOKE = ["resnet18", "squeezenet1_1", "shufflenet_v2_x0_5"]
SUBSETS = ("smoke", "quick", "classification", "segmentation", "video", "timm", "all")


def timm_installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def all_specs() -> dict[str, ModelSpec]:
    specs = {s.name: s for family in FAMILIES[:3] for s in torchvision_specs(family)}
    if timm_installed():
        specs.update({TIMM_PREFIX + n: ModelSpec(TIMM_PREFIX + n, "timm") for n in TIMM_MODELS})
    return specs


def select(subset: str, models: str | None) -> list[ModelSpec]:
    specs = all_specs()
    if models:
        unknown = [m for m in models.split(",") if m not in specs]
        if unknown:
            sys.exit(f"unknown model(s): {', '.join(unknown)} (timm ones need `pip install timm` and the "
                     f"'{TIMM_PREFIX}' prefix)")
        return [specs[m] for m in models.split(",")]
    if subset == "quick":
        names = QUICK + [TIMM_PREFIX + n for n in QUICK_TIMM if TIMM_PREFIX + n in specs]
        return [specs[n] for n in names]
    if subset == "smoke":
        return [specs[n] for n in SMOKE]
    if subset == "timm" and not timm_installed():
        sys.exit("--subset timm needs timm: pip install -e '.[bench]'")
    return [s for s in specs.values() if subset == "all" or s.family == subset]


def done_models(results: Path) -> set[str]:
    if not results.exists():
        return set()
    with results.open() as lines:
        return {json.loads(line)["model"] for line in lines if line.strip()}


def run_one(spec: ModelSpec, settings: Settings, timeout_s: float) -> dict:
    """``bench/measure.py`` for one model in a fresh process; a crash or timeout is a record too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, "-m", "bench.measure", spec.name, spec.family, json.dumps(asdict(settings)), str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            status, tail = ("ok", "") if out.exists() else (f"crash (exit {done.returncode})", done.stderr[-1500:])
        except subprocess.TimeoutExpired:
            status, tail = f"timeout after {timeout_s:.0f} s", ""
        record = json.loads(out.read_text()) if out.exists() else {
            "model": spec.name, "family": spec.family, "kind": spec.kind, "status": status, "reason": tail}
    record["wall_s"] = round(time.perf_counter() - start, 1)
    return record


def describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('reason', '')[-200:]}".strip()
    parts = []
    for tool in ("plain", "fxq"):
        result = record[tool]
        sqnr, speed = result.get("sqnr_db"), result.get("speedup")
        parts.append(f"{tool} {result['stage']}"
                     + (f" {sqnr:.1f} dB" if sqnr is not None else "")
                     + (f" {speed:.2f}x" if speed is not None else ""))
    return ", ".join(parts)


def run_metadata(args: argparse.Namespace, argv: list[str]) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"command": "python bench/zoo.py " + shlex.join(argv), "torch": torch.__version__,
            "timm": _version("timm"), "python": platform.python_version(), "cpu": cpu,
            # fbgemm's int8 speed and x86's default precision split depend on these
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "vnni": torch.cpu._is_vnni_supported(),
            "cores": os.cpu_count(), "threads": args.threads, "engine": torch.backends.quantized.engine,
            "fxq_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    parser.add_argument("--subset", choices=SUBSETS, default="quick")
    parser.add_argument("--models", help="comma-separated names (timm ones as timm:<name>); overrides --subset")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker (default 1)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=20, help="latency samples per model (median)")
    parser.add_argument("--timing-budget", type=float, default=60.0, help="max seconds of latency timing per model")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration/evaluation batch size")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=4, help="fresh batches for SQNR and top-1 agreement")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model before it is killed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results.jsonl/csv/json here")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="benchmarks.md and benchmarks.png here")
    parser.add_argument("--force", action="store_true", help="measure models already in results.jsonl again")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the CSV/JSON/markdown/plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if not args.report_only:
        settings = Settings(image_size=args.image_size, threads=args.threads, runs=args.runs,
                            timing_budget_s=args.timing_budget, batch_size=args.batch_size,
                            calibration_batches=args.calibration_batches, eval_batches=args.eval_batches)
        (args.out / "run.json").write_text(json.dumps(run_metadata(args, argv), indent=1))
        specs = select(args.subset, args.models)
        done = set() if args.force else done_models(results)
        todo = [s for s in specs if s.name not in done]
        print(f"{len(specs)} models, {len(specs) - len(todo)} already in {results}", flush=True)
        for index, spec in enumerate(todo, 1):
            if not args.force and spec.name in done_models(results):
                continue  # another zoo.py sharing this --out measured it meanwhile
            record = run_one(spec, settings, args.timeout)
            with results.open("a") as out:
                out.write(json.dumps(record) + "\n")
            print(f"[{index}/{len(todo)}] {spec.name:32s} {record['wall_s']:6.1f}s  {describe(record)}", flush=True)
    return report.main([str(results), "--docs", str(args.docs)])


if __name__ == "__main__":
    sys.exit(main())
