"""moe_experts in float32 at FuseMoE's shape (K 8320, H 4096, N 1536, E 8, top-4, gelu_tanh; tf32 not
allowed): its GEMMs' dots as three tf32 products on the tensor cores ("tf32x3", shipped) at the
family's float32 tile (moe.FP32_TILES) and at others (each GEMM's block_n x block_k; 8 warps, 3
stages), and on the FMA units at the 32 x 32 tile ("ieee", shipped before), against the per-expert
torch loop (F.linear in float32). Each path's max error against a float64 reference, of the largest
output. do_bench microseconds (the loop syncs on the host, so no CUDA graphs).

    python -m perf.moe_fp32_tf32x3 [M ...]        (CUDA machine)
"""
import importlib
import sys
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

import fused_ops
from perf.bench_moe import E, H, K, N, _routing, torch_loop

MOE = importlib.import_module("fused_ops.moe")
TILES = ((32, 32), (64, 32), (128, 32))     # (block_n, block_k); 32 x 32: the tile kept from the FMA dots


def tiled(block_n: int, block_k: int):
    """moe._for_dtype with float32's tile replaced."""
    def for_dtype(g, dtype, family):
        return g if dtype.itemsize <= 2 else replace(g, block_n=block_n, block_k=block_k, num_warps=8, num_stages=3)
    return for_dtype


def main(rows) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; float32 "
          f"K {K} H {H} N {N} E {E} top-4; us per call (do_bench); err: max |y - y64| / max |y64|", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(E, H, K, device="cuda", generator=g) * K ** -0.5
    b1 = torch.randn(E, H, device="cuda", generator=g) * 0.1
    w2 = torch.randn(E, N, H, device="cuda", generator=g) * H ** -0.5
    b2 = torch.randn(E, N, device="cuda", generator=g) * 0.1
    shipped, shipped_tile = MOE.gemm_precision, MOE._for_dtype
    fma = lambda dtype, device: "ieee"  # noqa: E731
    contenders = [("tf32x3 (shipped)", shipped, shipped_tile), ("ieee (FMA) n32k32", fma, tiled(32, 32))]
    contenders += [(f"tf32x3 n{n}k{k}", shipped, tiled(n, k)) for n, k in TILES]
    for M in rows:
        x = torch.randn(M, K, device="cuda", generator=g)
        weights, indices = _routing(M, g)
        want = fused_ops.reference.moe_experts(x.double(), weights.double(), indices, w1.double(), b1.double(),
                                               w2.double(), b2.double(), activation="gelu_tanh")
        err = lambda y: ((y.double() - want).abs().max() / want.abs().max()).item()  # noqa: E731
        line = []
        for label, precision, tile in contenders:
            MOE.gemm_precision, MOE._for_dtype = precision, tile
            try:
                run = lambda: fused_ops.moe_experts(x, weights, indices, w1, b1, w2, b2)  # noqa: E731
                line.append(f"moe {label} {do_bench(run, rep=200) * 1e3:.0f} (err {err(run()):.1e})")
            finally:
                MOE.gemm_precision, MOE._for_dtype = shipped, shipped_tile
        run = lambda: torch_loop(x, weights, indices, w1, b1, w2, b2)  # noqa: E731
        line.append(f"torch loop {do_bench(run, rep=200) * 1e3:.0f} (err {err(run()):.1e})")
        print(f"M {M}:\n  " + "\n  ".join(line), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 32, 256, 2048])
