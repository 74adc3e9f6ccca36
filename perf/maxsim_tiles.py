"""MaxSim tilings beyond the tuner's space on the two compute-bound shapes (ColPali: Nq=1, Lq=1024,
Nd=1000, Ld=1030; batch: Nq=16, Lq=32, Nd=10000, real lengths 100..300), bf16, d=128. Prints
do_bench medians and TFLOP/s on real tokens; a tiling that does not compile is reported as such.

    python -m perf.maxsim_tiles        (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
from triton.testing import do_bench

from fused_ops.tunables import _maxsim_inputs

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPES = {"colpali": (1, 1024, 1000, 1030, 1030, 1030, 128), "nq16": (16, 32, 10000, 300, 100, 300, 128)}
TILINGS = [(256, 128, 8, 3), (256, 64, 8, 3), (256, 128, 16, 3), (256, 64, 16, 3), (256, 128, 16, 2),
           (256, 256, 16, 2), (128, 128, 8, 3), (128, 256, 8, 2), (256, 32, 8, 4)]   # block_q, block_d, warps, stages


def main() -> None:
    for name, shape in SHAPES.items():
        _maxsim_inputs.cache_clear()
        Q, D, lengths = _maxsim_inputs(*shape)
        n_queries, q_tokens, n_docs, _, _, _, dim = shape
        flops = 2 * n_queries * q_tokens * lengths.sum().item() * dim
        for tiling in TILINGS:
            try:
                config = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, torch.bfloat16,
                                              *maxsim._device_limits(Q.device), tiling=maxsim.Tiling(*tiling))
                ms = do_bench(lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", config), rep=300)
                print(f"{name} {tiling}: {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as error:                          # a tiling ptxas cannot build
                print(f"{name} {tiling}: failed ({type(error).__name__})", flush=True)


if __name__ == "__main__":
    main()
