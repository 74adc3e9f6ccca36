"""python -m perf [--families gating router moe maxsim tuning] [--ops OP ...] [--quick] [--out DIR]

Measures the ceilings, runs every benchmark family on the GPU at hand, and writes
`<out>/results.csv` plus one PNG per plotted op (default out: perf/results/<gpu name>/).
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch

from fused_ops.tuning import device_key

from . import harness

FAMILIES = ["gating", "router", "moe", "maxsim", "tuning"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--quick", action="store_true", help="the headline shapes only")
    parser.add_argument("--out", default=None, help="output folder (default perf/results/<gpu>)")
    parser.add_argument("--ops", nargs="+", help="only these ops of the families (the CSV's op column)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m perf needs a CUDA GPU: the sweeps time kernels on the device")

    env = harness.environment()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", device_key(env["gpu"]))
    os.makedirs(out, exist_ok=True)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}: measuring ceilings")
    ceilings = harness.measure_ceilings()
    print(f"  read {ceilings.read_gb_s:.0f} GB/s, bf16 GEMM {ceilings.bf16_tflop_s:.0f} TFLOP/s")

    rows, plots = [], []
    for name in args.families:
        family = importlib.import_module(f"perf.bench_{name}")
        rows += harness.run_cases([c for c in family.cases(args.quick) if not args.ops or c.op in args.ops],
                                  ceilings, env)
        plots += family.PLOTS
    csv_path = os.path.join(out, "results.csv")
    harness.write_csv(rows, csv_path, ceilings, env)
    for op, x_field in plots:
        harness.plot(rows, op, x_field, os.path.join(out, f"{op}.png"))
    print(f"wrote {csv_path} and {len(plots)} plots")
    harness.print_table(rows)


if __name__ == "__main__":
    main()
