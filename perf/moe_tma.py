"""The first MoE GEMM at 8192 tokens (K=8320, H=4096, E=8, k=4, bf16, the shipped config) with the
weight tiles through TMA descriptors and through pointers: do_bench medians and whether the two
outputs are bitwise equal.

    python -m perf.moe_tma        (CUDA machine, sm_90 / sm_100)
"""
from __future__ import annotations

import torch
import triton
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_ops import moe
from fused_ops.tunables import _moe_inputs

M, K, H, N, E, TOP_K = 8192, 8320, 4096, 1536, 8, 4
ROUNDS = 7


def main() -> None:
    x, _, indices, w1, b1, _, _ = _moe_inputs(M, K, H, N, E, TOP_K)
    cfg = moe.pick_config(M * TOP_K, E, x.device)
    g1 = cfg.gemm1
    pairs, tile_bucket = moe.launch_moe_align(indices, E, cfg.block_m)
    n_tiles = tile_bucket.numel()
    out = {tma: torch.empty((M * TOP_K, H), dtype=x.dtype, device="cuda") for tma in (False, True)}
    desc = TensorDescriptor.from_tensor(w1.view(E * H, K), [g1.block_n, g1.block_k])

    def gemm1(tma: bool):
        moe.moe_gemm1_kernel[(n_tiles * triton.cdiv(H, g1.block_n),)](
            x, w1, desc if tma else w1, b1, out[tma], pairs, tile_bucket, M * TOP_K, TOP_K, E, n_tiles, K, H,
            x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), b1.stride(0), b1.stride(1),
            out[tma].stride(0), HAS_BIAS=True, ACTIVATION="gelu_tanh", TMA=tma, SWAP_AB=cfg.swap_ab,
            DOT_F32=False, PRECISION="ieee", BLOCK_M=cfg.block_m, **moe._tile_constexprs(g1, K),
            num_warps=g1.num_warps, num_stages=g1.num_stages)

    flops = 2 * M * TOP_K * K * H
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {cfg}")
    times = {False: [], True: []}
    for _ in range(ROUNDS):             # alternate: clocks fall under sustained load, for both alike
        for tma in (False, True):
            times[tma].append(do_bench(lambda: gemm1(tma), rep=100))
    for tma, ms_list in times.items():
        ms = sorted(ms_list)[ROUNDS // 2]
        print(f"gemm1 {'TMA     ' if tma else 'pointers'} median {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
              f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})")
    print("outputs bitwise equal:", torch.equal(out[False], out[True]))     # every pair's row is written


if __name__ == "__main__":
    main()
