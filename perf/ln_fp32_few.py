"""float32 layernorm_linear at 1-16 rows, x [M, 8320], N = 4096: the few-rows kernel (products kept
per lane, [rows, columns, K lanes] in registers, summed over K once after the loop) at 2-3 tilings
for each row count, K split to about 1, 2 or 4 programs' worth an SM, with the finish kernel adding
the slices; the op, cuBLAS F.linear alone and torch beside them. CUDA-graph microseconds, errors
against float64. (perf/results/NVIDIA_H100_80GB_HBM3/ln_fp32_few.txt)

    python -m perf.ln_fp32_few [M ...]        (CUDA machine; default: every row count in TILES)
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton

import fused_ops
from perf.ln_few_rows import LN, error, timed

K, N = 8320, 4096
# rows -> (BLOCK_N, BLOCK_K, warps) candidates
TILES = {1: [(32, 128, 4), (64, 64, 4), (16, 256, 4)],
         2: [(32, 64, 4), (16, 128, 4)],
         4: [(32, 64, 4), (16, 64, 4), (32, 64, 8)],
         8: [(16, 64, 4), (32, 32, 4), (32, 64, 8)],
         16: [(16, 32, 4), (16, 64, 8), (32, 32, 8)],
         32: [(16, 32, 8), (32, 16, 8), (16, 16, 4)],
         64: [(16, 16, 8), (8, 32, 8)]}


def launch(x, g, w, sums, y, tile, per_sm: int) -> int:
    """The few-rows kernel at `tile`, K cut to about per_sm programs an SM, and the finish; returns
    the slice count."""
    M = x.shape[0]
    saved = dict(LN.FEW_ROWS_TILES)
    LN.FEW_ROWS_TILES[LN.pow2(M)] = tile
    try:
        cfg = LN.few_rows_config(M)
        blocks = triton.cdiv(N, cfg["BLOCK_N"])
        slices, k_chunk = LN._k_slices(triton.cdiv(per_sm * LN.sm_count(x.device), blocks), K, cfg["BLOCK_K"])
        parts = LN.split_parts(slices, M, N, x.device)
        LN.launch_few_rows(x, g, w, parts, k_chunk)
        LN.launch_finish(*parts, sums, w, y, K, 1e-5)
    finally:
        LN.FEW_ROWS_TILES.update(saved)
    return slices


def main(rows) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; float32, K {K}, "
          f"N {N}; CUDA-graph us per call; tile = rows x columns x K lanes / warps, [n] K slices", flush=True)
    g, b, bias = (torch.randn(n, device="cuda") for n in (K, K, N))
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    sums, _ = LN.weight_sums(w, g, b, bias)
    for M in rows:
        tiles = TILES[M]
        x = torch.randn(M, K, device="cuda")
        y = torch.empty(M, N, device="cuda")
        want = F.linear(F.layer_norm(x.double(), (K,), g.double(), b.double()), w.double(), bias.double())
        out = [f"public op {timed(lambda: fused_ops.layernorm_linear(x, g, b, w, bias)):.1f}"]
        for tile in tiles:
            for per_sm in (1, 2, 4):
                y.fill_(float("nan"))
                slices = launch(x, g, w, sums, y, tile, per_sm)
                err = error(y, want)
                t = timed(lambda: launch(x, g, w, sums, y, tile, per_sm))
                out.append(f"{M}x{tile[0]}x{tile[1]}/w{tile[2]} [{slices}] {t:.1f} (err {err:.1e})")
        out.append(f"cublas {timed(lambda: F.linear(x, w, bias)):.1f}")
        out.append(f"torch {timed(lambda: F.linear(F.layer_norm(x, (K,), g, b), w, bias)):.1f}")
        print(f"M {M}:\n  " + "\n  ".join(out), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(TILES))
