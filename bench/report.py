"""Turn ``results.jsonl`` into results.csv/json, ``docs/benchmarks.md`` and the speed/SQNR plot.

Separate from running, so the report can be rewritten without measuring again::

    python bench/report.py bench/results/results.jsonl [--docs docs]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

TOOLS = {"plain": "plain FX", "fxq": "fxq"}
MIN_CNN_SPEEDUP = 1.3
MAX_SLOWDOWN_VS_PLAIN = 1.05
MIN_MEDIAN_GAIN_DB = 3.0
CSV_FIELDS = ["model", "family", "kind", "params_m", "input_shape", "status", "reason", "fp32_ms", "fp32_mb"] + [
    f"{tool}_{field}" for tool in TOOLS for field in
    ("stage", "error", "sqnr_db", "top1_agreement", "latency_ms", "speedup", "size_mb", "quantize_s",
     "quantize_ops", "dequantize_ops", "int8_ops", "float_weight_modules")] + ["fxq_float_nodes", "fxq_float_node_reasons"]


def load(results: Path) -> list[dict]:
    """The latest record of each model (a --force rerun appends a newer one), in first-seen order."""
    latest: dict[str, dict] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[record["model"]] = record
    return list(latest.values())


def tool(record: dict, name: str) -> dict:
    """The record's result for one tool; a skipped/crashed model has none."""
    return record.get(name) or {}


def ok(record: dict, name: str) -> bool:
    return tool(record, name).get("stage") == "ok"


def stage(record: dict, name: str) -> str:
    return tool(record, name).get("stage") or record["status"].split(" ")[0]


def flat_row(record: dict) -> dict:
    row = {key: record.get(key, "") for key in ("model", "family", "kind", "params_m", "status", "reason")}
    row.update(input_shape="x".join(map(str, record.get("input_shape", []))),
               fp32_ms=record.get("fp32", {}).get("latency_ms", ""), fp32_mb=record.get("fp32", {}).get("size_mb", ""))
    for name in TOOLS:
        for key, value in tool(record, name).items():
            if f"{name}_{key}" in CSV_FIELDS:
                row[f"{name}_{key}"] = json.dumps(value) if isinstance(value, dict) else value
    return row


# --- summary --------------------------------------------------------------------------------


def _median_min(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    return (statistics.median(values), min(values)) if values else (None, None)


def summarize(records: list[dict]) -> dict:
    measured = [r for r in records if r["status"] != "skipped"]
    summary: dict = {"models": len(records), "skipped": {r["model"]: r.get("reason", "") for r in records
                                                         if r["status"] == "skipped"}}
    for name in TOOLS:
        sqnrs = [tool(r, name)["sqnr_db"] for r in measured if ok(r, name) and tool(r, name).get("sqnr_db") is not None]
        speeds = [tool(r, name)["speedup"] for r in measured if ok(r, name) and tool(r, name).get("speedup")]
        summary[name] = {"stages": dict(Counter(stage(r, name) for r in measured).most_common()),
                         "sqnr_median_min": _median_min(sqnrs), "speedup_median_min": _median_min(speeds)}
    both = [r for r in measured if ok(r, "plain") and ok(r, "fxq") and tool(r, "plain").get("sqnr_db") is not None
            and tool(r, "fxq").get("sqnr_db") is not None]
    summary["sqnr_gain_median_min"] = _median_min([tool(r, "fxq")["sqnr_db"] - tool(r, "plain")["sqnr_db"] for r in both])
    summary["misses"] = target_misses(measured, summary["sqnr_gain_median_min"][0])
    return summary


def _evidence(record: dict) -> str:
    fxq, plain = tool(record, "fxq"), tool(record, "plain")
    text = (f"fxq Q/DQ {fxq.get('quantize_ops', '?')}/{fxq.get('dequantize_ops', '?')}, int8 ops {fxq.get('int8_ops', '?')}, "
            f"float nodes {fxq.get('float_nodes', '?')}; plain FX Q/DQ {plain.get('quantize_ops', '-')}/"
            f"{plain.get('dequantize_ops', '-')}, int8 ops {plain.get('int8_ops', '-')}")
    if fxq.get("float_weight_modules"):
        text += f"; fxq float weight modules {fxq['float_weight_modules']}"
    reasons = list(fxq.get("float_node_reasons", {}).items())[:3]
    if reasons:
        text += "; kept float: " + "; ".join(f"{count}x {why}" for why, count in reasons)
    return text


def _missed(record: dict) -> list[str]:
    """The targets ``record`` misses, each with its numbers."""
    fxq, plain = tool(record, "fxq"), tool(record, "plain")
    if not ok(record, "fxq"):
        return [f"fxq failed at {stage(record, 'fxq')}: {fxq.get('error') or record.get('reason', '')}"]
    missed = []
    if plain.get("sqnr_db") is not None and (fxq.get("sqnr_db") if fxq.get("sqnr_db") is not None else -1e9) < plain["sqnr_db"]:
        missed.append(f"SQNR {_num(fxq.get('sqnr_db'), 2)} dB < plain FX {_num(plain['sqnr_db'], 2)} dB")
    if record["kind"] == "cnn" and fxq.get("speedup", 0) < MIN_CNN_SPEEDUP:
        missed.append(f"{_num(fxq.get('speedup'), 3)}x fp32 < {MIN_CNN_SPEEDUP}x")
    if plain.get("latency_ms") and fxq.get("latency_ms", 0) > MAX_SLOWDOWN_VS_PLAIN * plain["latency_ms"]:
        missed.append(f"{_num(fxq['latency_ms'], 2)} ms vs plain FX {_num(plain['latency_ms'], 2)} ms")
    return missed


def target_misses(measured: list[dict], median_gain: Optional[float]) -> list[str]:
    """One line per model that misses a target, with the converted-graph evidence."""
    misses = []
    for record in measured:
        missed = _missed(record)
        if missed and ok(record, "fxq"):
            misses.append(f"`{record['model']}`: " + "; ".join(missed) + f" — {_evidence(record)}")
        elif missed:
            misses.append(f"`{record['model']}`: {missed[0]}")
    if median_gain is not None and median_gain < MIN_MEDIAN_GAIN_DB:
        misses.append(f"median SQNR gain over plain FX is {median_gain:+.1f} dB < +{MIN_MEDIAN_GAIN_DB:.0f} dB")
    return misses


# --- markdown ---------------------------------------------------------------------------------


def _num(value, digits: int = 1) -> str:
    return "-" if value is None or value == "" else f"{value:.{digits}f}"


def _stage_cell(record: dict, name: str) -> str:
    result = tool(record, name)
    if not result:
        return record["status"].split(" ")[0]
    return result["stage"] if result["stage"] == "ok" else f"**{result['stage']}**"


def model_table(records: list[dict]) -> list[str]:
    lines = ["| model | params M | input | plain FX | fxq | SQNR plain | SQNR fxq | Δ dB | top-1 plain | top-1 fxq "
             "| fp32 ms | plain ms | fxq ms | plain × | fxq × | MB fp32 / plain / fxq | fxq quantize s | fxq Q/DQ | fxq float nodes |",
             "|" + "---|" * 19]
    for r in records:
        if r["status"] == "skipped":
            continue
        p, f = tool(r, "plain"), tool(r, "fxq")
        gain = f["sqnr_db"] - p["sqnr_db"] if f.get("sqnr_db") is not None and p.get("sqnr_db") is not None else None
        cells = [f"`{r['model']}`", _num(r.get("params_m")), "x".join(map(str, r.get("input_shape", [])[1:])),
                 _stage_cell(r, "plain"), _stage_cell(r, "fxq"), _num(p.get("sqnr_db")), _num(f.get("sqnr_db")),
                 _num(gain, 1), _num(p.get("top1_agreement"), 2), _num(f.get("top1_agreement"), 2),
                 _num(r.get("fp32", {}).get("latency_ms"), 2), _num(p.get("latency_ms"), 2), _num(f.get("latency_ms"), 2),
                 _num(p.get("speedup"), 2), _num(f.get("speedup"), 2),
                 " / ".join(_num(x) for x in (r.get("fp32", {}).get("size_mb"), p.get("size_mb"), f.get("size_mb"))),
                 _num(f.get("quantize_s")), f"{f.get('quantize_ops', '-')}/{f.get('dequantize_ops', '-')}",
                 str(f.get("float_nodes", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(records: list[dict]) -> list[str]:
    lines = ["| family | models | tool | stages | SQNR median / min dB | speed-up median / min |", "|---|---|---|---|---|---|"]
    groups = {"all": records, **{fam: [r for r in records if r["family"] == fam] for fam in dict.fromkeys(r["family"] for r in records)}}
    for family, group in groups.items():
        summary = summarize(group)
        for name, label in TOOLS.items():
            s = summary[name]
            stages = ", ".join(f"{k} {v}" for k, v in s["stages"].items())
            lines.append(f"| {family} | {summary['models'] - len(summary['skipped'])} | {label} | {stages} | "
                         + " / ".join(_num(v) for v in s["sqnr_median_min"]) + " | "
                         + " / ".join(_num(v, 2) for v in s["speedup_median_min"]) + " |")
    return lines


def _settings(records: list[dict]) -> str:
    found = {json.dumps(r["settings"], sort_keys=True) for r in records if "settings" in r}
    if len(found) != 1:
        return f"{len(found)} different settings across models (see results.json)"
    settings = json.loads(found.pop())
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
    if settings.get("runs", 20) < 10:
        text += " (**short settings: a coverage run; its timings are not the published numbers**)"
    elif settings.get("image_size", 224) != 224:
        text += f" (**inputs are {settings['image_size']} px, not 224: latencies and speed-ups are for that size**)"
    return text


def _isa(meta: dict) -> str:
    if "cpu_capability" not in meta:
        return ""
    return f", {meta['cpu_capability']}, {'with' if meta.get('vnni') else 'no'} VNNI"


def markdown(records: list[dict], meta: dict) -> str:
    summary = summarize(records)
    gain = summary["sqnr_gain_median_min"]
    lines = ["# Benchmarks", "", "<!-- generated by bench/report.py from bench/zoo.py results: do not edit by hand -->", "",
             "Random-init models (no downloads) with BatchNorm statistics re-estimated on standard-normal inputs; "
             "int8 by plain `prepare_fx`/`convert_fx` (`get_default_qconfig_mapping(\"x86\")`) and by `fxq.quantize`, "
             "both calibrated on the same random batches. SQNR and top-1 agreement are against fp32 on fresh inputs; "
             "random-init nets amplify noise layer after layer, so SQNR compares the two tools on one model rather "
             "than promising an accuracy. Latency: batch 1, median of interleaved runs of fp32 / plain FX / fxq in "
             "one process; speed-up = fp32 latency / int8 latency. Sizes are `torch.save(state_dict)`.", "",
             f"- command: `{meta.get('command', '?')}`",
             f"- machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores{_isa(meta)}; "
             f"torch.set_num_threads({meta.get('threads', '?')}); quantized engine {meta.get('engine', '?')}",
             f"- torch {meta.get('torch', '?')}, timm {meta.get('timm') or 'not installed'}, Python {meta.get('python', '?')}; "
             f"fxq {meta.get('fxq_commit', '?')}; {meta.get('date', '?')}",
             f"- settings: {_settings(records)}", "", "## Summary", "", *summary_lines(records), "",
             f"fxq SQNR gain over plain FX, on models both quantize: median {_num(gain[0])} dB, min {_num(gain[1])} dB.", ""]
    if summary["skipped"]:
        lines += ["Skipped (> 150M parameters): " + ", ".join(f"`{m}` ({why.split(' ')[0]})" for m, why in summary["skipped"].items()), ""]
    lines += ["### Target misses", "", "Targets: fxq quantizes and runs every model with no NaN; fxq SQNR >= plain FX on every "
              f"model and median >= +{MIN_MEDIAN_GAIN_DB:.0f} dB; fxq >= {MIN_CNN_SPEEDUP}x fp32 on every CNN and never more than "
              f"{(MAX_SLOWDOWN_VS_PLAIN - 1) * 100:.0f}% slower than plain FX.", ""]
    lines += [f"- {m}" for m in summary["misses"]] or ["- none"]
    lines += ["", "## Per model", "", "![speed-up vs SQNR](benchmarks.png)", ""]
    for family in dict.fromkeys(r["family"] for r in records):
        lines += [f"### {family}", "", *model_table([r for r in records if r["family"] == family]), ""]
    failed = [r for r in records if r["status"] != "skipped" and not (ok(r, "plain") and ok(r, "fxq"))]
    if failed:
        lines += ["## Errors", ""] + [f"- `{r['model']}` {name}: {stage(r, name)}: "
                                      f"{(tool(r, name).get('error') or r.get('reason', '')).replace('|', '/')}"
                                      for r in failed for name in TOOLS if not ok(r, name)] + [""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Optional[str]:
    """Speed-up vs SQNR, one point per model and tool; None, or why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot written"
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in records:
        p, f = tool(r, "plain"), tool(r, "fxq")
        if all(t.get("sqnr_db") is not None and t.get("speedup") for t in (p, f)):
            ax.plot([p["sqnr_db"], f["sqnr_db"]], [p["speedup"], f["speedup"]], color="0.8", lw=0.7, zorder=1)
    for (name, label), color in zip(TOOLS.items(), ("tab:orange", "tab:blue")):
        points = [(tool(r, name)["sqnr_db"], tool(r, name)["speedup"], r["model"]) for r in records
                  if ok(r, name) and tool(r, name).get("sqnr_db") is not None and tool(r, name).get("speedup")]
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], s=18, color=color, label=label, zorder=2)
        if name == "fxq":
            for x, y, model in points:
                ax.annotate(model.replace("timm:", "t:"), (x, y), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.axhline(MIN_CNN_SPEEDUP, color="tab:red", lw=0.6, ls="--", label=f"{MIN_CNN_SPEEDUP}x fp32 (CNN target)")
    ax.set(xlabel="output SQNR vs fp32 (dB)", ylabel="speed-up vs fp32 at batch 1",
           title="int8: plain FX vs fxq (grey line joins one model's two points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def write_all(results: Path, docs: Path) -> list[str]:
    """Write every output; returns the paths written (and any skip message)."""
    records = load(results)
    meta_path = results.parent / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    csv_path, json_path = results.with_suffix(".csv"), results.with_suffix(".json")
    with csv_path.open("w", newline="") as out:
        writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat_row(r) for r in records)
    json_path.write_text(json.dumps({"meta": meta, "summary": summarize(records), "models": records}, indent=1))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(markdown(records, meta))
    skipped = plot(records, docs / "benchmarks.png")
    return [str(csv_path), str(json_path), str(docs / "benchmarks.md"), skipped or str(docs / "benchmarks.png")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.jsonl written by bench/zoo.py")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                        help="where benchmarks.md and benchmarks.png go (default docs/)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(f"no results at {args.results}: run bench/zoo.py first", file=sys.stderr)
        return 1
    for written in write_all(args.results, args.docs):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
