"""Offline compile (no GPU) of the top-k MaxSim builds of shipped tilings (16-bit, every d family)
at each WINDOW, reporting registers and spills: the evidence behind doc_window's per-document sums
(WINDOW 0) on the top-k path for tiles whose S tile takes 128 registers a thread, tiles taller than
128 rows, and the (target, tile) pairs of WINDOW_SPILLS. Run it under each Triton version in question:

    python -m perf.maxsim_window_spills [block_q,block_d,warps,stages ...] [--cc 90,100,120]

(default: the 128 x 128 / 4-warp / 2-stage tiling for sm_90)
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

import triton

from fused_ops import offline

maxsim = importlib.import_module("fused_ops.maxsim")
DEFAULT_TILING = maxsim.Tiling(128, 128, 4, 2)


def report(tiling, cc: int) -> None:
    print(f"triton {triton.__version__}, sm_{cc}, top-k builds of {tiling}")
    # one build per name: a tiling's builds differ by target only in WINDOW, which is set here
    builds = {b.name: b for b in maxsim.offline_builds() if b.constexprs["TOPK"] and "bf16" in b.name
              and (b.constexprs["BLOCK_Q"], b.constexprs["BLOCK_D"], b.num_warps, b.num_stages)
              == (tiling.block_q, tiling.block_d, tiling.num_warps, tiling.num_stages)}.values()
    if not builds:
        print("  not a shipped tiling: no builds")
    for build in builds:
        for window in (16, 0):
            variant = dataclasses.replace(build, name=f"{build.name}_WINDOW{window}",
                                          constexprs={**build.constexprs, "WINDOW": window})
            r = offline.compile_build(variant, cc)
            print(f"{variant.name:<52} regs {r.registers:>3}  stack {r.stack:>3}  local {r.local:>3}  "
                  f"{'fits' if r.fits else 'SPILLS'}", flush=True)


def main() -> None:
    args = sys.argv[1:]
    ccs = [90]
    if "--cc" in args:
        at = args.index("--cc")
        ccs = [int(cc) for cc in args[at + 1].split(",")]
        del args[at:at + 2]
    tilings = [maxsim.Tiling(*(int(v) for v in arg.split(","))) for arg in args] or [DEFAULT_TILING]
    for tiling in tilings:
        for cc in ccs:
            report(tiling, cc)


if __name__ == "__main__":
    main()
