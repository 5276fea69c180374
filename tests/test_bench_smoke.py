"""Smoke test of the zoo benchmark (bench/zoo.py, bench/report.py): the outputs exist and make sense.

No timing assertions: CI machines are shared and noisy. The real numbers are in docs/benchmarks.md.
"""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_MODELS = {"resnet18", "squeezenet1_1", "shufflenet_v2_x0_5"}


def _zoo(*args: str) -> str:
    command = [sys.executable, str(ROOT / "bench" / "zoo.py"), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_smoke_subset_writes_sane_results(tmp_path):
    out, docs = tmp_path / "results", tmp_path / "docs"
    args = ["--subset", "smoke", "--image-size", "64", "--runs", "2", "--timing-budget", "2", "--batch-size", "2",
            "--calibration-batches", "2", "--eval-batches", "2", "--out", str(out), "--docs", str(docs)]
    _zoo(*args)

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == SMOKE_MODELS
    for record in records:
        assert record["status"] == "ok" and record["fp32_finite"]
        assert record["input_shape"] == [1, 3, 64, 64]
        assert record["fp32"]["latency_ms"] > 0 and record["fp32"]["size_mb"] > 0
        fxq = record["fxq"]
        assert fxq["stage"] == "ok", fxq["error"]
        assert math.isfinite(fxq["sqnr_db"]) and 0.0 <= fxq["top1_agreement"] <= 1.0
        assert fxq["latency_ms"] > 0 and fxq["speedup"] > 0 and fxq["quantize_s"] > 0
        assert 0 < fxq["size_mb"] < record["fp32"]["size_mb"]  # int8 weights are smaller
        assert fxq["quantize_ops"] >= 1 and fxq["dequantize_ops"] >= 1 and fxq["int8_ops"] > 0
        assert record["plain"]["stage"] in {"ok", "trace", "prepare", "calibrate", "convert", "run", "nan"}

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["model"] for row in rows} == SMOKE_MODELS and all(row["fxq_stage"] == "ok" for row in rows)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["fxq"]["stages"] == {"ok": 3}
    markdown = (docs / "benchmarks.md").read_text()
    assert "--subset smoke" in markdown and "torch.set_num_threads(1)" in markdown
    assert all(f"`{name}`" in markdown for name in SMOKE_MODELS)

    # Resumable: a second run measures nothing and only rewrites the report.
    assert "3 already in" in _zoo(*args)
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_report_lists_failures_and_target_misses(tmp_path):
    def result(stage, sqnr=None, speedup=None, latency=None):
        return {"stage": stage, "error": "" if stage == "ok" else "TraceError: control flow", "sqnr_db": sqnr,
                "speedup": speedup, "latency_ms": latency, "quantize_ops": 3, "dequantize_ops": 3, "int8_ops": 9,
                "float_nodes": 2, "float_node_reasons": {"no int8 kernel for SiLU": 2}}

    base = {"family": "classification", "kind": "cnn", "params_m": 1.0, "input_shape": [1, 3, 8, 8],
            "fp32": {"latency_ms": 10.0, "size_mb": 4.0}, "status": "ok"}
    records = [
        {**base, "model": "good", "plain": result("ok", 20.0, 2.0, 5.0), "fxq": result("ok", 25.0, 2.0, 5.0)},
        {**base, "model": "worse", "plain": result("ok", 20.0, 2.0, 5.0), "fxq": result("ok", 15.0, 1.1, 9.0)},
        {**base, "model": "broken", "plain": result("trace"), "fxq": result("convert")},
        {"model": "huge", "family": "classification", "kind": "cnn", "status": "skipped", "reason": "600M parameters > 150M"},
        {"model": "slow", "family": "video", "kind": "cnn", "status": "timeout after 5 s", "reason": ""},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(results), "--docs", str(tmp_path)],
                   check=True, capture_output=True)

    markdown = (tmp_path / "benchmarks.md").read_text()
    misses = markdown.split("### Target misses")[1].split("## Per model")[0]
    assert "`worse`: SQNR 15.00 dB < plain FX 20.00 dB; 1.100x fp32 < 1.3x; 9.00 ms vs plain FX 5.00 ms" in misses
    assert "2x no int8 kernel for SiLU" in misses
    assert "`broken`: fxq failed at convert" in misses and "`slow`: fxq failed at timeout" in misses
    assert "`good`" not in misses and "`huge` (600M)" in markdown
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["fxq"]["stages"] == {"ok": 2, "convert": 1, "timeout": 1}
    assert summary["sqnr_gain_median_min"] == [0.0, -5.0]
