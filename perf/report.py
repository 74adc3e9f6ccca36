"""Regenerate the README's results tables (one per committed sweep CSV) from the CSVs (so it cannot drift from the data).

python -m perf.report           rewrite the block between the README's results markers and redraw
                                each results folder's plots from its CSVs
python -m perf.report --check   exit 1 if the README's block differs from what the CSVs give
"""
from __future__ import annotations

import argparse
import glob
import os

from .harness import _best, is_peer, plot, read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def table_for(csv_path: str) -> str:
    rows = [r for r in read_csv(csv_path) if r["op"] != "ceiling" and not r["op"].startswith("tuned_")]
    ceilings = {r["provider"]: r for r in read_csv(csv_path) if r["op"] == "ceiling"}
    if not rows:
        return ""
    env = rows[0]
    lines = [f"**{env['gpu']}** — torch {env['torch']}, triton {env['triton']}, {env['date']}; measured ceilings: "
             f"{ceilings['read_gb_s']['gb_s']:.0f} GB/s read, {ceilings['bf16_tflop_s']['tflop_s']:.0f} TFLOP/s bf16. "
             f"Times are medians (CUDA-graph replay where it was faster); floor = max(bytes / read BW, FLOPs / GEMM rate).",
             "",
             "| op | shape | dtype | fused_ops ms | of floor | best peer | peer ms | speedup |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    cases = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    for (op, shape, dtype), group in cases.items():
        ours = [r for r in group if r["provider"] == "fused_ops"]
        peers = [r for r in group if is_peer(r["provider"])]
        if not ours:
            continue
        o = ours[0]
        peer = min(peers, key=_best) if peers else None
        peer_cols = (f"{peer['provider']} | {_best(peer):.4f} | {_best(peer) / _best(o):.2f}x" if peer
                     else "- | - | -")
        lines.append(f"| {op} | {shape} | {dtype} | {_best(o):.4f} | {o['floor_ratio']:.0%} | {peer_cols} |")
    return "\n".join(lines)


def tuned_table_for(csv_path: str) -> str:
    """perf/bench_tuning.py's rows: fallback against the shipped tuned config, per kernel and bucket."""
    rows = [r for r in read_csv(csv_path) if r["op"].startswith("tuned_")]
    if not rows:
        return ""
    env = rows[0]
    lines = [f"**{env['gpu']}**, tuned against fallback configs — torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}; medians (ms); \"-\" where the shipped entry is the fallback itself.",
             "",
             "| kernel | shape | fallback ms | tuned ms | speedup |",
             "|---|---|---:|---:|---:|"]
    cases = {}
    for r in rows:
        cases.setdefault((r["op"][len("tuned_"):], r["shape"]), {})[r["provider"].split(" (")[0]] = _best(r)
    for (kernel, shape), times in cases.items():
        fallback, tuned = times["fused_ops fallback"], times.get("fused_ops tuned")
        tuned_cols = f"{tuned:.4f} | {fallback / tuned:.2f}x" if tuned else "- | -"
        lines.append(f"| {kernel} | {shape} | {fallback:.4f} | {tuned_cols} |")
    return "\n".join(lines)


def generate() -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "perf", "results", "*", "*.csv"))):
        for table in (table_for(path), tuned_table_for(path)):
            if table:
                parts.append(table)
    return "\n\n".join(parts) if parts else "_No GPU results committed yet._"


def redraw_plots() -> None:
    import importlib

    from .__main__ import FAMILIES
    plots = [p for name in FAMILIES for p in importlib.import_module(f"perf.bench_{name}").PLOTS]
    for path in sorted(glob.glob(os.path.join(ROOT, "perf", "results", "*", "*.csv"))):
        rows = [r for r in read_csv(path) if r["op"] != "ceiling"]
        for op, x_field in plots:
            if any(r["op"] == op for r in rows):
                plot(rows, op, x_field, os.path.join(os.path.dirname(path), f"{op}.png"))


def replace_block(text: str, block: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the README's results block differs from what the CSVs give")
    args = parser.parse_args(argv)
    with open(README) as f:
        text = f.read()
    updated = replace_block(text, generate())
    if args.check:
        if updated != text:
            raise SystemExit("README results table is stale: run `python -m perf.report`")
        return
    with open(README, "w") as f:
        f.write(updated)
    redraw_plots()


if __name__ == "__main__":
    main()
