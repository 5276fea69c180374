"""``fxq`` command line: quantize a model given as ``module:factory`` and show what happened.

Example::

    fxq quantize torchvision.models:mobilenet_v2 --calib images/ --out mnv2.pt --dump dump/
    fxq report mnv2.pt                 # the quantization report of a saved model
    fxq compare torchvision.models:mobilenet_v2 --qmodel mnv2.pt   # SQNR per layer
    python -m fxq quantize             # resnet18, random init, random calibration data
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import fxq
from fxq.errors import FxqError
from fxq.fallback import median_latency
from fxq.modes import DEFAULT_MODE, MODES
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_batches(directory: str, size: int, batch_size: int, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` batches of the PNG/JPEG images in ``directory``, resized and normalized."""
    from PIL import Image  # a torchvision dependency
    from torchvision.transforms.functional import normalize, pil_to_tensor, resize
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FxqError(f"--calib {directory}: no .png/.jpg images found there")
    images = []
    for path in files[:limit * batch_size]:
        with Image.open(path) as opened:
            image = pil_to_tensor(opened.convert("RGB"))
        image = resize(image.float() / 255.0, [size, size], antialias=True)
        images.append(normalize(image, IMAGENET_MEAN, IMAGENET_STD))
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def _float_model_and_data(args: argparse.Namespace):
    """The model (BatchNorm statistics made realistic), an example input and calibration batches."""
    torch.manual_seed(args.seed)
    model = load_factory(args.model)()
    size = args.image_size

    def make_batch(batch: int = args.batch_size) -> torch.Tensor:
        return torch.randn(batch, 3, size, size)

    recalibrate_batchnorm(model, make_batch)
    if args.calib == "random":
        calibration = [make_batch() for _ in range(args.batches)]
    else:
        calibration = image_batches(args.calib, size, args.batch_size, args.batches)
    return model, (calibration[0][:1],), calibration


def _quantize_command(args: argparse.Namespace) -> int:
    model, example, calibration = _float_model_and_data(args)
    qmodel = fxq.quantize(model, example, calibration_data=calibration, backend=args.backend, dump_dir=args.dump,
                          target_sqnr=args.target_sqnr, mode=args.mode)
    print(fxq.report(qmodel))
    fresh = torch.randn(4, *example[0].shape[1:])
    with torch.no_grad():
        sqnr = sqnr_db(model(fresh), qmodel(fresh))
    fp32 = median_latency(model, example, args.runs)
    int8 = median_latency(qmodel, example, args.runs)
    report = fxq.report(qmodel)
    rows = [("output SQNR (fresh inputs)", f"{sqnr:.1f} dB"),
            (f"latency batch 1 ({torch.get_num_threads()} threads)",
             f"fp32 {fp32 * 1e3:.2f} ms  int8 {int8 * 1e3:.2f} ms  ({fp32 / int8:.2f}x)"),
            ("size", f"fp32 {report.fp32_bytes / 1e6:.2f} MB  int8 {report.int8_bytes / 1e6:.2f} MB"),
            ("int8 ops / float ops", f"{report.quantized_ops} / {len(report.float_nodes)}"),
            ("Q/DQ transitions", f"{report.transitions}")]
    if report.fallback is not None:
        fallback = report.fallback
        rows.append(("target", f"{fallback.target}: {'met' if fallback.met else 'NOT met'}, "
                               f"{len(fallback.kept_float)} layer(s) kept float, held-out SQNR "
                               f"{fallback.sqnr_before:.1f} -> {fallback.sqnr_after:.1f} dB"))
    if args.dump:
        rows.append(("graph dump", str(Path(args.dump) / "index.html")))
    if args.out:
        rows.append(("saved", str(fxq.save(qmodel, args.out))))
    print("\n" + _table(rows))
    return 0


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _report_command(args: argparse.Namespace) -> int:
    print(fxq.report(fxq.load(args.path)))
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    model, example, calibration = _float_model_and_data(args)
    if args.qmodel:
        qmodel = fxq.load(args.qmodel)
    else:
        qmodel = fxq.quantize(model, example, calibration_data=calibration, backend=args.backend, mode=args.mode)
    result = fxq.compare(model, qmodel, calibration[0])
    print(result)
    worst = ", ".join(f"{row['node']} ({row['layer_sqnr']:.1f} dB)" for row in result.worst(args.worst))
    print(f"lowest layer SQNR: {worst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    quantize = commands.add_parser("quantize", help="quantize a model and print the report")
    _model_arguments(quantize)
    quantize.add_argument("--runs", type=int, default=20, help="latency runs (median)")
    quantize.add_argument("--out", help="save the quantized model here (fxq.save; read it with fxq.load)")
    quantize.add_argument("--dump", metavar="DIR", help="draw every stage into DIR (open DIR/index.html)")
    quantize.add_argument("--target-sqnr", type=float, metavar="DB",
                          help="keep the most damaging layers float until the held-out output SQNR reaches DB")
    quantize.set_defaults(handler=_quantize_command)
    report = commands.add_parser("report", help="print the quantization report of a saved model")
    report.add_argument("path", help="a file written by fxq quantize --out / fxq.save")
    report.set_defaults(handler=_report_command)
    compare = commands.add_parser("compare", help="SQNR per layer, int8 vs float, in graph order")
    _model_arguments(compare)
    compare.add_argument("--qmodel", help="compare this saved model (same model and --seed) instead of quantizing")
    compare.add_argument("--worst", type=int, default=3, help="how many of the worst layers to name")
    compare.set_defaults(handler=_compare_command)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"module:factory or file.py:factory (default {DEFAULT_MODEL})")
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=MODES,
                        help=f"static, dynamic or auto (default {DEFAULT_MODE}; see docs/modes.md)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib", default="random", metavar="random|DIR",
                        help="calibration data: random normal batches, or a directory of .png/.jpg images")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's random init and the data")


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
