"""``fxq`` command line: quantize a model given as ``module:factory`` and show what happened.

Example::

    fxq quantize torchvision.models:mobilenet_v2 --image-size 224 --batches 16
    python -m fxq quantize            # resnet18, random init, random calibration data
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import fxq
from fxq.errors import FxqError
from fxq.tensors import sqnr_db

DEFAULT_MODEL = "torchvision.models:resnet18"


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    module_part, _, attribute = spec.rpartition(":")
    if not module_part or not attribute:
        raise FxqError(f"model spec {spec!r} must look like 'torchvision.models:resnet18' or 'file.py:factory'")
    if module_part.endswith(".py"):
        path = Path(module_part)
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        if loader_spec is None or not path.exists():
            raise FxqError(f"no such file: {path}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise FxqError(f"{module_part} has no callable {attribute!r}")
    return factory


def recalibrate_batchnorm(model: nn.Module, make_batch: Callable[[], torch.Tensor], batches: int = 8) -> None:
    """Give a randomly initialised model realistic BatchNorm statistics (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(make_batch())
    model.eval()


def median_latency(model: nn.Module, inputs: tuple, runs: int) -> float:
    with torch.no_grad():
        model(*inputs)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*inputs)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _quantize_command(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = load_factory(args.model)()
    size = args.image_size

    def make_batch(batch: int = args.batch_size) -> torch.Tensor:
        return torch.randn(batch, 3, size, size)

    recalibrate_batchnorm(model, make_batch)
    example = (make_batch(1),)
    calibration = [make_batch() for _ in range(args.batches)]
    qmodel = fxq.quantize(model, example, calibration_data=calibration, backend=args.backend)
    print(fxq.report(qmodel))
    fresh = make_batch(4)
    with torch.no_grad():
        print(f"\noutput SQNR int8 vs fp32 on fresh inputs: {sqnr_db(model(fresh), qmodel(fresh)):.1f} dB")
    fp32 = median_latency(model, example, args.runs)
    int8 = median_latency(qmodel, example, args.runs)
    print(f"latency at batch 1, median of {args.runs}: fp32 {fp32 * 1e3:.2f} ms, int8 {int8 * 1e3:.2f} ms "
          f"({fp32 / int8:.2f}x), {torch.get_num_threads()} threads")
    if args.out:
        torch.save(qmodel, args.out)
        print(f"saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    quantize = commands.add_parser("quantize", help="quantize a model and print the report")
    quantize.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                          help=f"module:factory or file.py:factory (default {DEFAULT_MODEL})")
    quantize.add_argument("--backend", default="x86")
    quantize.add_argument("--image-size", type=int, default=224)
    quantize.add_argument("--batches", type=int, default=8, help="random calibration batches")
    quantize.add_argument("--batch-size", type=int, default=4)
    quantize.add_argument("--runs", type=int, default=20, help="latency runs (median)")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.add_argument("--out", help="save the quantized model here (torch.save)")
    quantize.set_defaults(handler=_quantize_command)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "handler", None) is None:
        args = build_parser().parse_args(["quantize", *(argv or [])])
    try:
        return args.handler(args)
    except FxqError as error:
        print(f"fxq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
