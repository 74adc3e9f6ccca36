"""maxsim_topk against maxsim alone on the issue's top-k shape (Nq=16, Lq=32, Nd=1M, Ld=128, real
lengths in [100, 128], k=100, bf16, d=128), and where the top-k path's time goes: the kernel alone
(per-group candidates), the final selection over the candidates alone, and each path at the
other's tile. CUDA-graph replays (no host work), rounds alternated (clocks fall under sustained load),
medians; every top-k variant must return the same indices as ranked_topk over maxsim's scores.

    python -m perf.maxsim_topk_ab [rounds] [BEFORE_MODULE]        (CUDA machine)

BEFORE_MODULE: an importable copy of an earlier fused_ops/maxsim.py (e.g. `git show REV:fused_ops/maxsim.py
> fused_ops/_maxsim_before.py`), whose maxsim_topk is timed beside this one.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

from fused_ops import reference
from fused_ops.tunables import _maxsim_inputs

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPE = (16, 32, 1_000_000, 128, 100, 128, 128)       # Nq, Lq, Nd, Ld, lo, hi, d
K = 100


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    before = importlib.import_module(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    Q, D, lengths = _maxsim_inputs(*SHAPE)
    n_queries, q_tokens, n_docs, *_, dim = SHAPE
    scores_cfg = maxsim.pick_config(n_queries, q_tokens, n_docs, dim, Q.dtype, Q.device)
    topk_cfg = maxsim.pick_config(n_queries, q_tokens, n_docs, dim, Q.dtype, Q.device, K)
    print(f"scores config {scores_cfg}\ntop-k config {topk_cfg}")
    keys = maxsim._launch(Q, D, lengths, False, None, "sum", K, topk_cfg)
    runs = {
        "maxsim": lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", scores_cfg),
        "maxsim_topk": lambda: maxsim.launch_maxsim_topk(Q, D, K, None, lengths, "sum", topk_cfg),
        "topk kernel only": lambda: maxsim._launch(Q, D, lengths, False, None, "sum", K, topk_cfg),
        "final selection only": lambda: maxsim.decode_keys(torch.topk(keys, K, dim=1).values),
    }
    if before is not None:
        runs["maxsim_topk before"] = lambda: before.launch_maxsim_topk(Q, D, K, None, lengths, "sum", topk_cfg)
    # each path at the other's tile, and the scoring path's tile capped at 128 registers a thread
    # (two 8-warp programs per SM where shared memory holds two): is the pair compared at their best?
    scores_tiling = maxsim.Tiling(scores_cfg.block_q, scores_cfg.block_d, scores_cfg.num_warps, scores_cfg.num_stages)
    topk_tiling = maxsim.Tiling(topk_cfg.block_q, topk_cfg.block_d, topk_cfg.num_warps, topk_cfg.num_stages)
    limits = maxsim._device_limits(Q.device)
    for tiling in (scores_tiling, dataclasses.replace(scores_tiling, max_registers=128)):
        cfg = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, Q.dtype, *limits, K, tiling)
        runs[f"maxsim_topk {cfg}"] = lambda cfg=cfg: maxsim.launch_maxsim_topk(Q, D, K, None, lengths, "sum", cfg)
        if before is not None and not tiling.max_registers:
            runs[f"maxsim_topk before {cfg}"] = \
                lambda cfg=cfg: before.launch_maxsim_topk(Q, D, K, None, lengths, "sum", cfg)
    wide = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, Q.dtype, *limits, tiling=topk_tiling)
    runs[f"maxsim {wide}"] = lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", wide)
    want = reference.ranked_topk(runs["maxsim"](), K)
    for name, run in runs.items():
        if name.startswith("maxsim_topk"):
            values, idx = run()
            if not (torch.equal(idx, want[1]) and torch.allclose(values, want[0], rtol=1e-5, atol=1e-4)):
                print(f"MISMATCH against ranked_topk over maxsim's scores: {name}")
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(do_bench_cudagraph(run, rep=400))
    for name, ms_list in times.items():
        ms = sorted(ms_list)[len(ms_list) // 2]
        print(f"{name:80s} {ms:8.3f} ms  (rounds: {' '.join(f'{t:.3f}' for t in ms_list)})", flush=True)


if __name__ == "__main__":
    main()
