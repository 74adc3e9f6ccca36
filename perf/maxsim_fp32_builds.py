"""Why float32 MaxSim takes the tensor cores on sm_90 only, and for d up to 128: its tf32x3 builds
(three tf32 products) at every target, at the two tensor-core tilings (d = 128) and at the float32
family's 32 x 32 tile (d = 256), scoring path, one and eight queries a block. Prints each build's
shared memory, registers and spill instructions inside loops (offline.BuildReport).

    python -m perf.maxsim_fp32_builds        (offline: triton without TRITON_INTERPRET, no GPU needed)
"""
from __future__ import annotations

import dataclasses
import importlib

import triton

from fused_ops import offline

maxsim = importlib.import_module("fused_ops.maxsim")
STAGES = {90: 3, 100: 3, 120: 2}            # as _stages gives the 64 x 64 tile (sm_120: 99 KB a block)


def main() -> None:
    print(f"triton {triton.__version__}")
    template = next(b for b in maxsim.offline_builds() if b.name.startswith("maxsim_fp32_d128_scores")
                    and b.name.endswith("_tf32x3"))
    cases = [(128, tiling) for tiling in maxsim.FP32_TENSOR_TILINGS] + [(256, maxsim.Tiling(32, 32, 4, 3))]
    for dim, tiling in cases:
        for qpb_pad in (1, 8):
            for cc in offline.TARGETS:
                stages = min(tiling.num_stages, STAGES[cc])
                build = dataclasses.replace(
                    template, name=f"d{dim} {tiling.block_q}x{tiling.block_d} w{tiling.num_warps} s{stages} q{qpb_pad}",
                    constexprs={**template.constexprs, "DIM": dim, "BLOCK_K": dim, "BLOCK_Q": tiling.block_q,
                                "BLOCK_D": tiling.block_d, "QPB_PAD": qpb_pad, "PRECISION": "tf32x3"},
                    num_warps=tiling.num_warps, num_stages=stages, targets=(cc,))
                r = offline._report(build, cc)
                print(f"{build.name} sm_{cc}: shared {r.shared} B, {r.registers} registers, {r.loop_spills} spill "
                      f"instructions in loops, fits {r.fits}{' ' + str(r.notes) if r.notes else ''}", flush=True)


if __name__ == "__main__":
    main()
