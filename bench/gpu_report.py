"""The markdown summary of a gpu-check report (report.json -> report.md), and the merge of runs.

python3 -m bench.gpu_report docs/gpu/report.json > docs/gpu/report.md
python3 -m bench.gpu_report --merge first.json second.json [--note TEXT ...] --out docs/gpu

A device lease rarely fits every part in one command: a second, shorter run of the parts the
first skipped or failed is merged into one report, each part's entry from the later run that ran
it, and the report's `runs` lists every command with its time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v else f"{v:,.4g}"
    return str(v)


def _model_tables(presets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for p in presets:
        lines.append(
            f"\n### {p['preset']} {p['dtype']}, {p['steps']} steps: {p['params'] / 1e6:.1f} M "
            f"parameters, {p['gflops_per_image_forward']} GFLOP per image per forward; "
            f"peak {p['peak_tflops']} TFLOP/s; empty graph replay {p['graph_launch_us']} us"
        )
        lines += _table(p["rows"], ["mode", "kernels", "batch", "eager_ms", "graph_ms", "graph_speedup",
                                    "images_per_s", "tflops", "pct_peak", "bound_ms", "x_bound",
                                    "graph_vs_reference_rel_err", "capture_s", "error"])  # fmt: skip
    return lines


def _section(name: str, part: dict[str, Any]) -> list[str]:
    res = part.get("result")
    run = f" (run {part['run']})" if "run" in part else ""
    lines = [f"## {name}", f"exit code {part.get('rc')}, {part.get('seconds', '-')} s{run}"]
    if part.get("skipped"):
        return [*lines, f"skipped: {part['skipped']}", ""]
    if name == "env" and res:
        lines += [f"- {k}: {v}" for k, v in res.items()]
    elif name == "kernels" and res:
        bad = [r for r in res if not r.get("ok")]
        lines.append(f"{len(res) - len(bad)} of {len(res)} cases within bound")
        lines += _table(
            res, ["op", "dtype", "shape", "note", "kernel_err", "torch_err", "bound", "ok", "error"]
        )
    elif name == "model" and res:
        lines += _model_tables(res)
    elif name == "qsweep" and res:
        lines += _table(res.get("sweep", []), ["R", "K", "gelu", "config", "ms", "gbps", "error"])
        lines += _model_tables(res.get("models", []))
    elif name == "profile" and res:
        cols = ["batch", "mode", "wall_ms", "profiled_wall_ms", "kernels", "kernel_ms", "busy", "matmul_ms",
                "attention_ms", "norm_ms", "quantize_ms", "copy_ms", "other_ms", "matmul_tflops",
                "attention_tflops",
                "error"]  # fmt: skip
        for p in res:
            lines.append(f"\n### {p['preset']} {p['dtype']}, {p['steps']} steps")
            lines += _table(p["rows"], cols)
            lines.append("")
            top = [{"batch": r["batch"], "mode": r["mode"], **t} for r in p["rows"] for t in r.get("top", [])]
            lines += _table(top, ["batch", "mode", "name", "class", "count", "ms", "pct"])
    elif name == "engine" and res:
        for r in res.get("consistency", []):
            lines.append(f"\n### cm-mnist {r['dtype']}: capture {r.get('capture_s')} s, "
                         f"{r.get('capture_memory_mb')} MB reserved, batch invariance max |diff| "
                         f"{r.get('batch_invariance_max_abs')} {r.get('error', '')}")  # fmt: skip
            lines += _table(r.get("vs_reference", []), ["steps", "n", "max_abs", "rel_err",
                                                        "uint8_pixels_differ", "uint8_max_diff"])  # fmt: skip
            lines.append("")
            lines += _table(
                r.get("per_bucket", []), ["steps", "batch", "served_ms", "replay_ms", "images_per_s"]
            )
            lines.append("")
            host_cols = ["steps", "batch", "noise_ms", "pin_ms", "runner_ms", "served_ms", "score_ms",
                         "torch_threads", "noise_1_thread_ms", "served_1_thread_ms"]  # fmt: skip
            lines += _table(r.get("host_breakdown", []), host_cols)
        for r in res.get("teacher", []):
            lines.append(f"\n### teacher {r['dtype']}: capture {r.get('capture_s')} s, replay ms per bucket "
                         f"{r.get('replay_ms')} {r.get('error', '')}")  # fmt: skip
            lines += _table(r.get("vs_reference", []), ["steps", "n", "max_abs", "rel_err",
                                                        "uint8_pixels_differ", "uint8_max_diff"])  # fmt: skip
    elif name == "frontend" and res:
        rows = [{"server": k, **v} for k, v in res.get("servers", {}).items()]
        cols = ["server", "clients", "requests_per_s", "server_cpu_cores", "requests_per_cpu_s",
                "main_process_cpu_cores", "p50_ms", "p99_ms", "errors"]  # fmt: skip
        lines += _table(rows, cols)
    elif name == "quality" and res:
        lines += _table(res, ["dtype", "seeds_from", "steps", "n", "fld", "class_accuracy", "error"])
    elif name == "asweep" and res:
        lines += _table(res, ["B", "H", "N", "Dh", "config", "ms", "tflops", "error"])
    elif name == "kbench" and res:
        cols = sorted({k for r in res for k in r})
        lines += _table(res, cols)
    else:
        lines += ["```", (part.get("log") or "")[-2500:], "```"]
    return [*lines, ""]


def merge(reports: list[dict[str, Any]], notes: list[str] | None = None) -> dict[str, Any]:
    """One report from runs on the same device, in run order: a part that ran (rc not None) in a
    later run replaces the earlier entry; parts keep the order of their first appearance."""
    devices = {r.get("device") for r in reports}
    if len(devices) != 1:
        raise ValueError(f"runs on different devices cannot be merged: {sorted(map(str, devices))}")
    runs: list[dict[str, Any]] = []
    parts: dict[str, Any] = {}
    for r in reports:
        first = len(runs) + 1  # a report merged before keeps its own parts' run numbers
        runs += r.get("runs", [{"time": r.get("time"), "command": r.get("command")}])
        for name, part in r.get("parts", {}).items():
            if name not in parts or part.get("rc") is not None:
                parts[name] = {**part, "run": first + part.get("run", 1) - 1}
    merged = {**reports[-1], "time": reports[0].get("time"), "runs": runs, "parts": parts}
    merged["command"] = " ; ".join(str(run["command"]) for run in runs)
    merged["notes"] = [*(n for r in reports for n in r.get("notes", [])), *(notes or [])]
    merged["ok"] = all(p.get("rc") == 0 for p in parts.values())
    return merged


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# gpu-check on {report.get('device')}"]
    if report.get("runs"):
        lines += [f"- run {i}: {run['time']}, `{run['command']}`" for i, run in enumerate(report["runs"], 1)]
        lines.append(f"- torch {report.get('torch')}; each part below says which run it comes from")
    else:
        lines.append(f"{report.get('time')}, torch {report.get('torch')}; `{report.get('command')}`")
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    lines.append("")
    for name, part in report.get("parts", {}).items():
        try:
            lines += _section(name, part)
        except Exception as e:  # a malformed part must not lose the rest of the summary
            lines += [f"## {name}", f"(summary failed: {e})", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="report JSON files (several with --merge, in run order)")
    ap.add_argument("--merge", action="store_true", help="merge the runs into one report")
    ap.add_argument("--note", action="append", default=[], help="a line for the merged report's head")
    ap.add_argument("--out", default="docs/gpu", help="where --merge writes <device>.json and .md")
    args = ap.parse_args()
    loaded = [json.loads(Path(p).read_text()) for p in args.reports]
    if not args.merge:
        print(markdown(loaded[0]), end="")
        return
    from bench.gpu_check import write_report

    print(write_report(merge(loaded, args.note), Path(args.out)))


if __name__ == "__main__":
    main()
