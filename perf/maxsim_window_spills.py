"""Offline compile (no GPU) of the top-k MaxSim builds of the shipped 128 x 128 / 4-warp tile for
sm_90 at each WINDOW, reporting registers and spills: the evidence behind doc_window's per-document
sums (WINDOW 0) for top-k tiles whose S tile takes 128 registers a thread. Run it under each Triton
version in question:

    python -m perf.maxsim_window_spills
"""
from __future__ import annotations

import dataclasses
import importlib

import triton

from fused_ops import offline

maxsim = importlib.import_module("fused_ops.maxsim")
TILING = maxsim.Tiling(128, 128, 4, 2)


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, top-k builds of {TILING}")
    builds = [b for b in maxsim.offline_builds() if b.constexprs["TOPK"] and b.constexprs["DIM"] == 128
              and (b.constexprs["BLOCK_Q"], b.constexprs["BLOCK_D"], b.num_warps, b.num_stages)
              == (TILING.block_q, TILING.block_d, TILING.num_warps, TILING.num_stages) and "bf16" in b.name]
    for build in builds:
        for window in (16, 0):
            variant = dataclasses.replace(build, name=f"{build.name}_WINDOW{window}",
                                          constexprs={**build.constexprs, "WINDOW": window})
            r = offline.compile_build(variant, 90)
            print(f"{variant.name:<52} regs {r.registers:>3}  stack {r.stack:>3}  local {r.local:>3}  "
                  f"{'fits' if r.fits else 'SPILLS'}", flush=True)


if __name__ == "__main__":
    main()
