"""The ``fxq`` command line, run as a subprocess on a small torchvision model."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fxq

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["torchvision.models:squeezenet1_0", "--image-size", "64", "--batches", "2", "--batch-size", "2"]


def run_fxq(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fxq", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``fxq quantize`` on a directory of images, with --out and --dump."""
    directory = tmp_path_factory.mktemp("cli")
    images = directory / "images"
    images.mkdir()
    torch.manual_seed(0)
    for index in range(4):
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{index}.png")
    out, dump = directory / "model.pt", directory / "dump"
    done = run_fxq("quantize", *SMALL, "--calib", images, "--runs", "2", "--out", out, "--dump", dump)
    return done, out, dump


def test_quantize_prints_report_and_summary_and_writes_files(quantized):
    done, out, dump = quantized
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fxq quantization report" in done.stdout
    for key in ("output SQNR", "latency batch 1", "size", "Q/DQ transitions", "saved"):
        assert key in done.stdout, key
    assert out.exists() and (dump / "index.html").exists()
    assert len(list(dump.glob("*_converted.html"))) == 1


def test_report_reads_the_saved_model(quantized):
    _, out, _ = quantized
    done = run_fxq("report", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("fxq quantization report") and "model size" in done.stdout
    assert str(fxq.report(fxq.load(out))).strip() == done.stdout.strip()


def test_compare_prints_a_row_per_layer(quantized):
    _, out, _ = quantized
    done = run_fxq("compare", *SMALL, "--qmodel", out)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["node", "op", "runs"]
    assert sum(line.startswith("features.") for line in lines) >= 20
    assert "output SQNR" in done.stdout and "lowest layer SQNR" in done.stdout


def test_help_lists_every_subcommand():
    done = run_fxq("--help")
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("quantize", "report", "compare"))
    assert "--calib" in run_fxq("quantize", "--help").stdout


def test_errors_exit_with_code_2_and_a_message(tmp_path):
    done = run_fxq("report", tmp_path / "missing.pt")
    assert done.returncode == 2 and "fxq: error: fxq.load: no such file" in done.stderr
    done = run_fxq("quantize", "not_a_spec")
    assert done.returncode == 2 and "must look like" in done.stderr
    done = run_fxq("quantize", *SMALL, "--calib", tmp_path)
    assert done.returncode == 2 and "no .png/.jpg images" in done.stderr
    assert run_fxq("frobnicate").returncode == 2  # argparse: unknown command


def test_quantize_with_a_target_sqnr_reports_the_fallback():
    done = run_fxq("quantize", *SMALL, "--runs", "1", "--target-sqnr", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "target output SQNR >= 3 dB" in done.stdout and "layers kept float for the target" in done.stdout
    assert "--target-sqnr" in run_fxq("quantize", "--help").stdout


def test_mode_flag_is_offered_and_checked():
    assert "{static,dynamic,auto}" in run_fxq("quantize", "--help").stdout
    done = run_fxq("quantize", *SMALL, "--mode", "bogus")
    assert done.returncode == 2 and "invalid choice" in done.stderr
