"""MaxSim tilings on the two compute-bound shapes (ColPali: Nq=1, Lq=1024, Nd=1000, Ld=1030; batch:
Nq=16, Lq=32, Nd=10000, real lengths 100..300), bf16, d=128, including some outside the tuner's
space. Rounds alternate (clocks fall under sustained load); do_bench medians and TFLOP/s on real
tokens; every tiling's scores are checked against the first one's; a tiling that does not compile
is reported as such.

    python -m perf.maxsim_tiles [block_q,block_d,warps,stages[,max_registers] ...]        (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import triton
from triton.testing import do_bench

from fused_ops.tunables import _maxsim_inputs

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPES = {"colpali": (1, 1024, 1000, 1030, 1030, 1030, 128), "nq16": (16, 32, 10000, 300, 100, 300, 128)}
TILINGS = [(128, 64, 4, 3), (256, 64, 4, 3), (256, 64, 8, 3), (256, 128, 8, 3), (128, 128, 4, 2), (128, 64, 8, 3),
           (128, 32, 4, 4), (256, 128, 16, 2)]       # block_q, block_d, warps, stages
ROUNDS = 3


def shape_inputs(shape: tuple) -> tuple:
    """(Q, D, lengths, FLOPs on real tokens) of a SHAPES entry (Nq, Lq, Nd, Ld, lo, hi, d), made afresh
    from fixed seeds."""
    _maxsim_inputs.cache_clear()
    Q, D, lengths = _maxsim_inputs(*shape)
    n_queries, q_tokens, _, _, _, _, dim = shape
    return Q, D, lengths, 2 * n_queries * q_tokens * lengths.sum().item() * dim


def main() -> None:
    tilings = [tuple(int(v) for v in arg.split(",")) for arg in sys.argv[1:]] or TILINGS
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, shape in SHAPES.items():
        Q, D, lengths, flops = shape_inputs(shape)
        n_queries, q_tokens, n_docs, _, _, _, dim = shape
        times, first = {}, None
        for _ in range(ROUNDS):
            for tiling in tilings:
                config = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, torch.bfloat16,
                                              *maxsim._device_limits(Q.device), tiling=maxsim.Tiling(*tiling))
                if times.get(tiling) == "failed":
                    continue
                try:
                    scores = maxsim.launch_maxsim(Q, D, None, lengths, "sum", config)
                    ms = do_bench(lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", config), rep=100)
                except Exception as error:                      # a tiling ptxas cannot build
                    print(f"{name} {tiling}: failed ({type(error).__name__})", flush=True)
                    times[tiling] = "failed"
                    continue
                first = scores if first is None else first
                diff = ((scores - first).abs() / first.abs().clamp_min(1e-6)).max().item()
                assert diff < 1e-5, (name, tiling, diff)
                times.setdefault(tiling, []).append(ms)
        for tiling, ms_list in times.items():
            if ms_list == "failed":
                continue
            ms = sorted(ms_list)[len(ms_list) // 2]
            print(f"{name} {tiling}: {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})", flush=True)


if __name__ == "__main__":
    main()
