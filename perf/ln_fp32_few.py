"""float32 layernorm_linear at 1-16 rows, x [M, 8320], N = 4096: a broadcast-product kernel whose
products stay per lane ([rows, columns, K lanes] in registers, summed over K once after the loop,
no cross-thread reduction inside it), K split over programs, the library's finish kernel adding
the slices (the weight's column sums from its cache), against the op (the rows kernel at 1-2 rows,
the float32 gemm from 3), cuBLAS F.linear alone and torch. CUDA-graph microseconds, errors against
float64.

    python -m perf.ln_fp32_few        (CUDA machine)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fused_ops
from perf.ln_few_rows import LN, error, timed

K, N = 8320, 4096
PIVOT_K = tl.constexpr(64)     # columns whose mean is every slice's pivot
# rows -> (BLOCK_M, BLOCK_N, BLOCK_K, warps) candidates
TILES = {1: [(1, 32, 128, 4), (1, 64, 64, 4), (1, 16, 256, 4)],
         2: [(2, 32, 64, 4), (2, 16, 128, 4)],
         4: [(4, 32, 64, 4), (4, 16, 64, 4), (4, 32, 64, 8)],
         8: [(8, 16, 64, 4), (8, 32, 32, 4), (8, 32, 64, 8)],
         16: [(16, 16, 32, 4), (16, 16, 64, 8), (16, 32, 32, 8)]}


@triton.jit
def few_rows_kernel(x_ptr, g_ptr, w_ptr, acc_part_ptr, stat_part_ptr, M, N, K, k_chunk, stride_x, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Program (column block j, K slice s): all M rows (<= BLOCK_M) x BLOCK_N columns over k_chunk of K;
    writes acc [S, M, N] and, from column block 0, the rows' shifted sums [S, 2, M]."""
    row = tl.arange(0, BLOCK_M)
    col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = LN.row_starts(x_ptr, row, M, stride_x)
    w_rows = LN.row_starts(w_ptr, col, N, stride_w)
    pivot = LN.row_pivot(x_rows, K, PIVOT_K)
    k_start = tl.program_id(1) * k_chunk
    lane = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    s1 = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    s2 = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in tl.range(k_start, tl.minimum(k_start + k_chunk, K), BLOCK_K, num_stages=STAGES):
        kk = k0 + lane
        k_ok = kk < K
        xs = tl.where(k_ok[None, :], tl.load(x_rows[:, None] + kk[None, :], mask=k_ok[None, :], other=0.0)
                      - pivot[:, None], 0.0)
        s1 += xs
        s2 += xs * xs
        a = xs * tl.load(g_ptr + kk, mask=k_ok, other=0.0)[None, :]
        w = tl.load(w_rows[:, None] + kk[None, :], mask=k_ok[None, :], other=0.0)
        acc += a[:, None, :] * w[None, :, :]
    split = tl.program_id(1).to(tl.int64)
    LN.store_tile(acc_part_ptr + split * M * N, N, row, col, M, N, tl.sum(acc, axis=2))
    if tl.program_id(0) == 0:
        stats = stat_part_ptr + split * 2 * M + row
        tl.store(stats, tl.sum(s1, axis=1), mask=row < M)
        tl.store(stats + M, tl.sum(s2, axis=1), mask=row < M)


def launch(x, g, w, sums, y, tile, slices_per_sm):
    M = x.shape[0]
    bm, bn, bk, warps = tile
    blocks = triton.cdiv(N, bn)
    slices, k_chunk = LN._k_slices(triton.cdiv(slices_per_sm * LN.sm_count(x.device), blocks), K, bk)
    parts = LN.split_parts(slices, M, N, x.device)
    few_rows_kernel[(blocks, slices)](x, g, w, *parts, M, N, K, k_chunk, x.stride(0), w.stride(0), BLOCK_M=bm,
                                      BLOCK_N=bn, BLOCK_K=bk, STAGES=3, num_warps=warps)
    LN.launch_finish(*parts, sums, w, y, K, 1e-5)
    return slices


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; float32, K {K}, "
          f"N {N}; CUDA-graph us per call; tile = rows x columns x K lanes / warps, [n] K slices", flush=True)
    g, b, bias = (torch.randn(n, device="cuda") for n in (K, K, N))
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    sums, _ = LN.weight_sums(w, g, b, bias)
    for M, tiles in TILES.items():
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
                out.append(f"{'x'.join(map(str, tile[:3]))}/w{tile[3]} [{slices}] {t:.1f} (err {err:.1e})")
        out.append(f"cublas {timed(lambda: F.linear(x, w, bias)):.1f}")
        out.append(f"torch {timed(lambda: F.linear(F.layer_norm(x, (K,), g, b), w, bias)):.1f}")
        print(f"M {M}:\n  " + "\n  ".join(out), flush=True)


if __name__ == "__main__":
    main()
