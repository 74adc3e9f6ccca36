"""layernorm_linear: y = LayerNorm(x) @ W^T + b, without writing LayerNorm(x) to memory.

One algebra for every kernel. Each row's pivot c (the mean of its first BLOCK_K values) is taken
out before anything is summed or multiplied: xs = x - c, a = xs * gamma. With d = mean(x) - c =
sum(xs) / K, var = sum(xs^2) / K - d^2 and rstd = 1 / sqrt(var + eps):

    LN(x) @ W^T = rstd * (a @ W^T - d * (W @ gamma)) + W @ beta

LayerNorm is shift-invariant, so this holds for any c; a c near the mean is what keeps it
accurate. For rows with a large mean and a tiny spread (x = 1000 + 0.01 * randn) the unshifted
E[x^2] - E[x]^2 and x @ W^T cancel away every digit, and a constant row (var = 0, so rstd =
1/sqrt(eps)) multiplies that rounding by ~300. Shifted, the sums and the dot see only the spread,
and rounding the dot operand to bf16/tf32 costs bits of the spread, not of the mean.

Kernels
- rows: BLOCK_M rows x BLOCK_N columns per program, K streamed once, the sums W @ gamma and
  W @ beta taken in the same loop (nothing precomputed). For small N (a router); wide N takes the
  kernels below at every M (at 1-64 16-bit rows x 8320 x 4096 on the H100 the gemm takes 32-33 us
  where this kernel took 58-365 us, and the few-rows kernel 51-79 us at 1-16 float32 rows against
  91-369, this kernel's per-step reductions binding it).
  When the grid cannot fill the GPU, K is split over programs and a finish kernel adds the parts.
  The router (router.py) builds its logits from the same helpers.
- gemm (large N and M), W @ gamma and W @ beta + bias from `weight_sums_kernel`, run once per weight
  version and cached, and tiles in grouped program order:
  - 16-bit: a plain pipelined GEMM on raw x, y = rstd * (x @ W'^T - mean * W' 1) + W @ beta + bias,
    with W' = W * gamma folded and cached beside the sums, and (mean, rstd) from a stats pass that
    reads x once (row_stats_kernel, ~5% of the GEMM at 8192 x 8320 x 4096). Where an SM holds a
    gemm tile and a statistics program at once (stats_beside), the pass runs beside the gemm: one
    program an SM counts finished row blocks, the gemm follows with programmatic dependent launch,
    and each tile waits for its row block's count before its epilogue. Both operands go
    straight from memory (TMA on sm_90/sm_100) to the tensor cores. Where the tiles would leave half
    the SMs or more idle (few rows), K is split over programs that write fp32 parts, and a finish
    kernel reads the rows' statistics as the stats pass does and adds the parts up (still two
    launches: gemm_split). Without the pivot the fp32 accumulator carries x's mean: acc and mean *
    W' 1 each round by ~2^-24 |mean| |W'|, relative to an output of size std |W'|, a loss of ~2^-24
    sqrt(K / BLOCK_K) |mean| / std. A 16-bit row whose spread is a few units in the last place of
    its mean has |mean| / std ~ 2^8 (bf16) or 2^11 (fp16): at K = 8320 a loss of ~2e-4 or ~2e-3,
    under the 1e-2 those dtypes are held to (the float32 pivot path has no such term). A constant
    row (std = 0) would multiply the rounding by 1/sqrt(eps): its stats pass gives rstd = 0, so y =
    W @ beta + bias, exactly LayerNorm's answer.
  - float32 (fp32 tolerance): the pivot path; the row statistics come from the x tiles it loads,
    shifted and scaled in registers, for the dot (tiles by family and M, GEMM_FP32). The dot takes
    three tf32 products on the tensor cores (gemm_precision: a = a_hi + a_lo, a_hi b_hi + a_hi b_lo
    + a_lo b_hi), whose error against float64 measured below the FMA units' (perf/ln_fp32_tf32x3.py),
    or one where torch allows tf32. K is split by the same rule; each slice's row sums go beside
    its part, and the rows kernel's finish adds them. Up to 16 rows, where the gemm is bound by its
    weight reads, the few-rows kernel takes its place: the same steps on the FMA units, the products
    kept per lane, K always split (few_rows_split).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference, tuning
from .launch_plans import LaunchPlans, current_stream, plans_apply, same_stamp, version_stamp
from ._runtime import (FP_FUSION, INTERPRET, PDL_MIN_MAJOR, TMA_FAMILIES, dot_precision, dot_upcast, gemm_precision,
                       max_registers, max_shared_memory, pow2, prefer_all_shared, rows, skips_dispatcher, sm_count,
                       sm_shared_memory, sm_threads, tma_ok, use_triton)

ROWS_MAX_N = 512         # widest N one rows-kernel program holds whole (a router's experts)
FEW_ROWS_MAX_M = 16      # float32 at wide N: up to this many rows take the few-rows kernel, more the gemm
FEW_ROWS_WARPS = 16      # the few-rows kernel's K slices aim at this many warps an SM (perf/ln_fp32_few.py)
TILE_BUDGET = 8192       # fp32 values in the widest per-step tile of the rows kernel (registers)
ROWS_STAGE_BYTES = 65536  # shared memory for the rows kernel's pipeline: 3 K steps in flight, else 2
EPILOGUE_SHARED = 32768  # shared memory a gemm config leaves beside its pipeline (epilogue layout change)


# ---------------------------------------------------------------------------------------------
# kernel helpers (also used by router.py)
# ---------------------------------------------------------------------------------------------
@triton.jit
def row_pivot(x_rows, K, BLOCK_K: tl.constexpr):
    """Mean of each row's first min(K, BLOCK_K) values: the shift taken out before any sum. Divided
    with round-to-nearest (GPU fp32 `/` may land an ulp off), so a constant 16-bit row's pivot is
    its value exactly and its shifted sums are exactly 0 (the constant-row rstd = 0 rule)."""
    col = tl.arange(0, BLOCK_K)
    return tile_pivot(tl.load(x_rows[:, None] + col[None, :], mask=col[None, :] < K, other=0.0), K, BLOCK_K)


@triton.jit
def tile_pivot(first_tile, K, BLOCK_K: tl.constexpr):
    """row_pivot from the rows' first [*, BLOCK_K] tile, already loaded (zero past K)."""
    return tl.math.div_rn(tl.sum(first_tile.to(tl.float32), axis=1), tl.minimum(K, BLOCK_K).to(tl.float32))


@triton.jit
def row_starts(base_ptr, idx, n, stride):
    """Pointers to rows `idx` of a [n, stride] matrix; indices past n wrap around, so loads need no
    row mask (the wrapped rows' results are never stored)."""
    return base_ptr + (idx % n).to(tl.int64) * stride


@triton.jit
def load_k(ptrs, k_ok, EVEN_K: tl.constexpr):
    """A tile or vector along K, zero past K unless K is whole steps (EVEN_K: no mask at all)."""
    if EVEN_K:
        values = tl.load(ptrs)
    else:
        values = tl.load(ptrs, mask=k_ok, other=0.0)
    return values


@triton.jit
def load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, EVEN_K: tl.constexpr):
    """(gamma, beta) for columns kk as fp32, 1 and 0 where absent, 0 past K."""
    if HAS_GAMMA:
        g = load_k(g_ptr + kk, k_ok, EVEN_K).to(tl.float32)
    else:
        g = tl.where(k_ok, 1.0, 0.0)
    if HAS_BETA:
        b = load_k(b_ptr + kk, k_ok, EVEN_K).to(tl.float32)
    else:
        b = tl.zeros(kk.shape, tl.float32)
    return g, b


@triton.jit
def dot_nt(a, b, acc, DOT_UPCAST: tl.constexpr):
    """acc + a @ b^T for 16-bit a and b (exact products, fp32 accumulation)."""
    if DOT_UPCAST:                                 # the interpreter's bf16 dot is wrong: fp32 there
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def ln_dot_sums(x_rows, pivot, w_rows, g_ptr, b_ptr, k_start, k_stop, K, HAS_GAMMA: tl.constexpr,
                HAS_BETA: tl.constexpr, COL_SUMS: tl.constexpr, DISTANCE: tl.constexpr, EVEN_K: tl.constexpr,
                USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                STAGES: tl.constexpr, BLOCK_K: tl.constexpr):
    """One pass over columns k_start:k_stop of the x rows at `x_rows` and the W rows at `w_rows`
    (pointer vectors from row_starts), all sums in fp32. Masks stop at K (a caller that slices K
    passes its slice's end; EVEN_K: everything is whole BLOCK_K steps, no masks). STAGES steps of
    loads are in flight at once (software pipelining through shared memory). The row and column
    sums are reduced each step (per-thread runs of 8 kept until the end needed a layout change
    that stored replicated values twice, which racecheck reports).

    Returns (acc, s1, s2, c1, c2, aa, ag):
      acc [BM, BN] = a @ W^T, or a @ (W - beta)^T for DISTANCE (tl.dot, or a broadcast product for
                     tiles under 16 rows)
      s1, s2 [BM]  = sum(xs), sum(xs^2)
      c1, c2 [BN]  = W @ gamma, W @ beta                            (COL_SUMS, else 0)
      aa, ag [BM]  = sum(a^2), a . gamma                            (DISTANCE, else 0)
    The dot takes W itself (exact in its dtype; DISTANCE subtracts a . beta after the loop). A 16-bit
    W meets a = hi + lo, two 16-bit halves: a alone rounded to 16 bits would put ~2^-9 of each
    product into the logits (bf16), enough to reorder near-tied experts; hi + lo carry ~2^-17.
    Unused results cost nothing: the compiler drops them.
    """
    BM: tl.constexpr = x_rows.shape[0]
    BN: tl.constexpr = w_rows.shape[0]
    acc = tl.zeros([BM, BN], tl.float32)
    s1 = tl.zeros([BM], tl.float32)
    s2 = tl.zeros([BM], tl.float32)
    aa = tl.zeros([BM], tl.float32)
    ag = tl.zeros([BM], tl.float32)
    ab = tl.zeros([BM], tl.float32)
    c1 = tl.zeros([BN], tl.float32)
    c2 = tl.zeros([BN], tl.float32)
    lane = tl.arange(0, BLOCK_K)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        kk = k0 + lane
        k_ok = kk < K
        x = load_k(x_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K)
        w = load_k(w_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K)
        g, b = load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA, HAS_BETA, EVEN_K)
        xs = x.to(tl.float32) - pivot[:, None]
        if not EVEN_K:
            xs = tl.where(k_ok[None, :], xs, 0.0)
        a = xs * g[None, :]
        s1 += tl.sum(xs, axis=1)
        s2 += tl.sum(xs * xs, axis=1)
        if DISTANCE:
            aa += tl.sum(a * a, axis=1)
            ag += tl.sum(a * g[None, :], axis=1)
            ab += tl.sum(a * b[None, :], axis=1)
        if COL_SUMS:
            c1 += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
            c2 += tl.sum(w.to(tl.float32) * b[None, :], axis=1)
        if not USE_DOT:
            acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        elif w.dtype == tl.float32:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        else:                                      # W straight from its load: no register round trip
            a_hi = a.to(w.dtype)
            acc = dot_nt(a_hi, w, acc, DOT_UPCAST)
            acc = dot_nt((a - a_hi.to(tl.float32)).to(w.dtype), w, acc, DOT_UPCAST)
    if DISTANCE:
        acc -= ab[:, None]
    return acc, s1, s2, c1, c2, aa, ag


@triton.jit
def ln_stats(s1, s2, K, eps):
    """(d = mean - pivot, rstd) from the shifted sums; var is clamped at 0, NaN stays NaN."""
    d = s1 / K
    var = s2 / K - d * d
    var = tl.where(var < 0.0, 0.0, var)
    return d, 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def ln_project(acc, d, rstd, c1, c2):
    """LN(x) @ W^T from acc = a @ W^T, the row stats, c1 = W @ gamma and c2 = W @ beta (+ bias)."""
    return rstd[:, None] * (acc - d[:, None] * c1[None, :]) + c2[None, :]


@triton.jit
def store_tile(ptr, stride, row, col, M, N, tile):
    """tile [BM, BN] -> ptr[row, col] (row stride `stride`, unit column stride), inside [M, N] only."""
    tl.store(ptr + row.to(tl.int64)[:, None] * stride + col[None, :], tile.to(ptr.dtype.element_ty),
             mask=(row < M)[:, None] & (col < N)[None, :])


@triton.jit
def store_projected(y_ptr, stride_y, row, col, M, N, acc, d, rstd, sums_ptr):
    """y[row, col] <- ln_project of acc with the rows' stats and the weight's sums [2, N] at sums_ptr."""
    c1 = tl.load(sums_ptr + col, mask=col < N, other=0.0)
    c2 = tl.load(sums_ptr + N + col, mask=col < N, other=0.0)
    store_tile(y_ptr, stride_y, row, col, M, N, ln_project(acc, d, rstd, c1, c2))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def layernorm_linear_rows_kernel(x_ptr, g_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, acc_part_ptr, stat_part_ptr,
                                 col_part_ptr, M, N, K, k_chunk, stride_x, stride_w, stride_y, eps,
                                 HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 SPLIT: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                                 DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j, s): rows block i, columns block j, K slice s (k_chunk columns).

    SPLIT: the slice's partial sums go to acc_part [S, M, N], stat_part [S, 2, M] (s1, s2) and, from
    row block 0, col_part [S, 2, N] (c1, c2), for the finish kernel; else the program writes y.
    """
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = row_starts(x_ptr, row, M, stride_x)
    k_start = tl.program_id(2) * k_chunk
    acc, s1, s2, c1, c2, _, _ = ln_dot_sums(
        x_rows, row_pivot(x_rows, K, BLOCK_K), row_starts(w_ptr, col, N, stride_w), g_ptr, b_ptr, k_start,
        tl.minimum(k_start + k_chunk, K), K, HAS_GAMMA, HAS_BETA, True, False, EVEN_K, USE_DOT, DOT_UPCAST,
        PRECISION, STAGES, BLOCK_K)
    if SPLIT:
        split = tl.program_id(2).to(tl.int64)
        store_tile(acc_part_ptr + split * M * N, N, row, col, M, N, acc)
        stats = stat_part_ptr + split * 2 * M + row
        tl.store(stats, s1, mask=row < M)
        tl.store(stats + M, s2, mask=row < M)
        if tl.program_id(0) == 0:                  # the column sums are the same for every row block
            cols = col_part_ptr + split * 2 * N + col
            tl.store(cols, c1, mask=col < N)
            tl.store(cols + N, c2, mask=col < N)
    else:
        if HAS_BIAS:
            c2 += tl.load(bias_ptr + col, mask=col < N, other=0.0).to(tl.float32)
        d, rstd = ln_stats(s1, s2, K, eps)
        store_tile(y_ptr, stride_y, row, col, M, N, ln_project(acc, d, rstd, c1, c2))


@triton.jit
def layernorm_linear_finish_kernel(acc_part_ptr, stat_part_ptr, col_part_ptr, bias_ptr, y_ptr, M, N, K,
                                   n_split, stride_y, eps, HAS_BIAS: tl.constexpr, COL_PARTS: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds up the K slices of the rows kernel or the float32 gemm and writes y. COL_PARTS: the slices'
    column sums (c1, c2) are in col_part [S, 2, N] (the rows kernel), else col_part holds the whole
    [2, N] sums, bias included (the gemm's cached weight_sums)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row < M
    col_ok = col < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    c1 = tl.zeros([BLOCK_N], tl.float32)
    c2 = tl.zeros([BLOCK_N], tl.float32)
    accs = acc_part_ptr + row.to(tl.int64)[:, None] * N + col[None, :]
    stats = stat_part_ptr + row
    cols = col_part_ptr + col
    for _ in range(n_split):                       # the partials are small: M * N stays in int32
        acc += tl.load(accs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s1 += tl.load(stats, mask=row_ok, other=0.0)
        s2 += tl.load(stats + M, mask=row_ok, other=0.0)
        accs += M * N
        stats += 2 * M
        if COL_PARTS:
            c1 += tl.load(cols, mask=col_ok, other=0.0)
            c2 += tl.load(cols + N, mask=col_ok, other=0.0)
            cols += 2 * N
    if not COL_PARTS:
        c1 = tl.load(cols, mask=col_ok, other=0.0)
        c2 = tl.load(cols + N, mask=col_ok, other=0.0)
    if HAS_BIAS:
        c2 += tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    d, rstd = ln_stats(s1, s2, K, eps)
    store_tile(y_ptr, stride_y, row, col, M, N, ln_project(acc, d, rstd, c1, c2))


@triton.jit
def weight_sums_kernel(w_ptr, g_ptr, b_ptr, bias_ptr, sums_ptr, folded_ptr, N, K, stride_w,
                       HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sums[0] = W @ gamma, sums[1] = W @ beta + bias, in fp32: the gemm epilogue's column terms.
    FOLD: also folded = W * gamma rounded to W's dtype ([N, K], contiguous), and sums[0] adds up
    those rounded values, so that mean * sums[0] is exactly the mean's share of x @ folded^T."""
    col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < N
    w_rows = row_starts(w_ptr, col, N, stride_w)
    c1 = tl.zeros([BLOCK_N], tl.float32)
    c2 = tl.zeros([BLOCK_N], tl.float32)
    lane = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + lane
        k_ok = kk < K
        w = tl.load(w_rows[:, None] + kk[None, :], mask=k_ok[None, :], other=0.0)
        g, b = load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA, HAS_BETA, False)
        wg = w.to(tl.float32) * g[None, :]
        if FOLD:
            wg = wg.to(w.dtype)
            tl.store(folded_ptr + col.to(tl.int64)[:, None] * K + kk[None, :], wg,
                     mask=col_ok[:, None] & k_ok[None, :])
        c1 += tl.sum(wg.to(tl.float32), axis=1)
        c2 += tl.sum(w.to(tl.float32) * b[None, :], axis=1)
    if HAS_BIAS:
        c2 += tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(sums_ptr + col, c1, mask=col_ok)
    tl.store(sums_ptr + N + col, c2, mask=col_ok)


@triton.jit
def add_shifted_sums(x_rows, kk, K, pivot, s1, s2):
    """(s1 + (x - pivot), s2 + (x - pivot)^2) per lane for the rows' columns kk (none past K)."""
    x = tl.load(x_rows[:, None] + kk[None, :], mask=(kk < K)[None, :], other=0.0).to(tl.float32)
    xs = tl.where((kk < K)[None, :], x - pivot[:, None], 0.0)
    return s1 + xs, s2 + xs * xs


@triton.jit
def row_mean_rstd(x_rows, K, eps, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """(mean, rstd) of the rows at x_rows, rstd 0 for a constant row (every x equal to the pivot:
    LN(x) = beta exactly, and the folded gemm's rounding must not be amplified by 1/sqrt(eps)).
    The first tile gives both the pivot (row_pivot's, without a second load) and the first sums; the
    loop's loads are pipelined STAGES deep. The sums stay per lane until the end: no cross-thread
    reduction inside the streaming loop."""
    lane = tl.arange(0, BLOCK_K)
    x = tl.load(x_rows[:, None] + lane[None, :], mask=(lane < K)[None, :], other=0.0).to(tl.float32)
    pivot = tile_pivot(x, K, BLOCK_K)
    s1 = tl.where((lane < K)[None, :], x - pivot[:, None], 0.0)
    s2 = s1 * s1
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        s1, s2 = add_shifted_sums(x_rows, k0 + lane, K, pivot, s1, s2)
    s2 = tl.sum(s2, axis=1)
    d, rstd = ln_stats(tl.sum(s1, axis=1), s2, K, eps)
    return pivot + d, tl.where(s2 == 0.0, 0.0, rstd)


@triton.jit
def row_stats_kernel(x_ptr, stats_ptr, count_ptr, M, K, stride_x, eps, COUNT_BLOCK: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """stats[0] = row mean, stats[1] = rstd (row_mean_rstd) for the folded gemm's epilogue, BLOCK_M
    rows a step, the programs striding over the steps in row order.
    COUNT_BLOCK > 0: the pass runs beside the gemm, and each step, once stored, adds 1 to
    count[its rows // COUNT_BLOCK] (the gemm's row block), which the gemm's tiles wait on.
    PDL: the gemm, launched with programmatic dependent launch, may start as soon as every program
    here has (so these programs never wait for an SM that a waiting tile holds)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    for step in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        row = step * BLOCK_M + tl.arange(0, BLOCK_M)
        mean, rstd = row_mean_rstd(row_starts(x_ptr, row, M, stride_x), K, eps, BLOCK_K, STAGES)
        tl.store(stats_ptr + row, mean, mask=row < M)
        tl.store(stats_ptr + M + row, rstd, mask=row < M)
        if COUNT_BLOCK > 0:
            tl.debug_barrier()                     # every thread's stores, then the count (release)
            tl.atomic_add(count_ptr + step * BLOCK_M // COUNT_BLOCK, 1, sem="release", scope="gpu")


@triton.jit
def slice_bounds(k_chunk, K, SPLIT: tl.constexpr):
    """[k_start, k_stop) of a gemm program's K slice (program_id(1)) where SPLIT, else all of K."""
    if SPLIT:
        k_start = tl.program_id(1) * k_chunk
        k_stop = tl.minimum(k_start + k_chunk, K)
    else:
        k_start = 0
        k_stop = K
    return k_start, k_stop


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of this program's output tile in grouped order: GROUP_M row blocks
    sweep the column blocks together, so W tiles stay in L2."""
    pid = tl.program_id(0)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return (first_m + (pid % in_group) % group_m) * BLOCK_M, ((pid % in_group) // group_m) * BLOCK_N


@triton.jit
def fp32_start(x_ptr, w_ptr, row, col, M, N, K, k_chunk, stride_x, stride_w, SPLIT: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """What the float32 kernels hold before their K loop: the x and W row pointers, the rows' pivot
    (the mean of their first BLOCK_K values, the same in every K slice, so the slices' parts add up),
    the slice's bounds (slice_bounds) and the rows' per-lane shifted sums, zero."""
    x_rows = row_starts(x_ptr, row, M, stride_x)
    s1 = tl.zeros([row.shape[0], BLOCK_K], tl.float32)
    k_start, k_stop = slice_bounds(k_chunk, K, SPLIT)
    return (x_rows, row_starts(w_ptr, col, N, stride_w), row_pivot(x_rows, K, BLOCK_K), k_start, k_stop, s1,
            tl.zeros([row.shape[0], BLOCK_K], tl.float32))


@triton.jit
def fp32_step(x_rows, w_rows, g_ptr, kk, K, pivot, s1, s2, HAS_GAMMA: tl.constexpr, EVEN_K: tl.constexpr):
    """One K step of the float32 kernels at columns kk: (a, w, s1, s2) with a = (x - pivot) * gamma
    [BM, BK], the weight's [BN, BK] tile, and the rows' shifted sums added per lane (no cross-thread
    reduction inside the loop: one every step bound the rows kernel at few rows)."""
    k_ok = kk < K
    xs = load_k(x_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K) - pivot[:, None]
    if not EVEN_K:
        xs = tl.where(k_ok[None, :], xs, 0.0)
    s1 += xs
    s2 += xs * xs
    if HAS_GAMMA:
        xs *= load_k(g_ptr + kk, k_ok, EVEN_K)[None, :]
    return xs, load_k(w_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K), s1, s2


@triton.jit
def store_fp32_parts(acc_part_ptr, stat_part_ptr, row, col, first_col, M, N, acc, s1, s2):
    """K slice program_id(1)'s acc to acc_part [S, M, N] and, from column block 0, its rows' shifted
    sums (s1, s2) to stat_part [S, 2, M] (the same for every column block), for
    layernorm_linear_finish_kernel."""
    split = tl.program_id(1).to(tl.int64)
    store_tile(acc_part_ptr + split * M * N, N, row, col, M, N, acc)
    if first_col == 0:
        stats = stat_part_ptr + split * 2 * M + row
        tl.store(stats, s1, mask=row < M)
        tl.store(stats + M, s2, mask=row < M)


@triton.jit
def layernorm_linear_gemm_kernel(x_ptr, g_ptr, w_ptr, sums_ptr, y_ptr, acc_part_ptr, stat_part_ptr, M, N, K, k_chunk,
                                 stride_x, stride_w, stride_y, eps, HAS_GAMMA: tl.constexpr, EVEN_K: tl.constexpr,
                                 PRECISION: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr):
    """float32 (33+ rows): one [BLOCK_M, BLOCK_N] tile of y, a = (x - pivot) * gamma through registers
    into the dot; sums = (W @ gamma, W @ beta + bias) from weight_sums_kernel.
    SPLIT: program (t, s) takes K slice s (k_chunk columns) of tile t and writes its parts
    (store_fp32_parts; sums_ptr, y_ptr unused)."""
    first_row, first_col = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row = first_row + tl.arange(0, BLOCK_M)
    col = first_col + tl.arange(0, BLOCK_N)
    x_rows, w_rows, pivot, k_start, k_stop, s1, s2 = fp32_start(x_ptr, w_ptr, row, col, M, N, K, k_chunk, stride_x,
                                                                 stride_w, SPLIT, BLOCK_K)
    lane = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        a, w, s1, s2 = fp32_step(x_rows, w_rows, g_ptr, k0 + lane, K, pivot, s1, s2, HAS_GAMMA, EVEN_K)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    s1 = tl.sum(s1, axis=1)
    s2 = tl.sum(s2, axis=1)
    if SPLIT:
        store_fp32_parts(acc_part_ptr, stat_part_ptr, row, col, first_col, M, N, acc, s1, s2)
    else:
        d, rstd = ln_stats(s1, s2, K, eps)
        store_projected(y_ptr, stride_y, row, col, M, N, acc, d, rstd, sums_ptr)


@triton.jit
def layernorm_linear_few_rows_kernel(x_ptr, g_ptr, w_ptr, acc_part_ptr, stat_part_ptr, M, N, K, k_chunk, stride_x,
                                     stride_w, HAS_GAMMA: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32, 1-16 rows (all in one program, BLOCK_M >= M): program (column block j, K slice s) takes
    BLOCK_N columns over k_chunk of K. The products stay per lane, [BLOCK_M, BLOCK_N, BLOCK_K] in
    registers, summed over K once after the loop; tl.dot's FMA tiles (the gemm kernel) read both
    operands from shared memory every step and took 2-3x longer here (perf/ln_fp32_few.py), its
    tf32x3 dot 1.4-2.7x (H200, ln_fp32_tf32x3.txt). Always writes its parts (store_fp32_parts) for
    layernorm_linear_finish_kernel."""
    row = tl.arange(0, BLOCK_M)
    first_col = tl.program_id(0) * BLOCK_N
    col = first_col + tl.arange(0, BLOCK_N)
    x_rows, w_rows, pivot, k_start, k_stop, s1, s2 = fp32_start(x_ptr, w_ptr, row, col, M, N, K, k_chunk, stride_x,
                                                                 stride_w, True, BLOCK_K)
    lane = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        a, w, s1, s2 = fp32_step(x_rows, w_rows, g_ptr, k0 + lane, K, pivot, s1, s2, HAS_GAMMA, EVEN_K)
        acc += a[:, None, :] * w[None, :, :]
    store_fp32_parts(acc_part_ptr, stat_part_ptr, row, col, first_col, M, N, tl.sum(acc, axis=2),
                     tl.sum(s1, axis=1), tl.sum(s2, axis=1))


@triton.jit
def layernorm_linear_folded_gemm_kernel(x_ptr, w_ptr, x_desc, w_desc, stats_ptr, count_ptr, sums_ptr, y_ptr, part_ptr,
                                        M, N, K, k_chunk, stride_x, stride_w, stride_y, TMA: tl.constexpr,
                                        EVEN_K: tl.constexpr, DOT_UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                                        STATS_ROWS: tl.constexpr, STAGES: tl.constexpr, BLOCK_M: tl.constexpr,
                                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """16-bit: one [BLOCK_M, BLOCK_N] tile of y = rstd * (x @ W'^T - mean * W' 1) + (W @ beta + bias), a
    plain pipelined GEMM on raw x (both operands straight from memory to the tensor cores), with
    W' = W * gamma (folded by weight_sums_kernel) and the row stats from row_stats_kernel.
    TMA: the tiles come through the descriptors x_desc, w_desc (the bulk copy engine, which zero-fills
    past M, N and K); else through pointers (x_desc, w_desc unused).
    SPLIT: program (t, s) takes K slice s (k_chunk columns) of tile t and writes its raw x @ W'^T to
    part [S, M, N] in fp32 (stats_ptr, y_ptr unused); folded_split_finish_kernel adds the slices up.
    STATS_ROWS > 0: the statistics pass runs beside this gemm (row_stats_kernel's COUNT_BLOCK =
    BLOCK_M, STATS_ROWS rows a step), and each tile waits for its row block's count before reading them."""
    first_row, first_col = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row = first_row + tl.arange(0, BLOCK_M)
    col = first_col + tl.arange(0, BLOCK_N)
    x_rows = row_starts(x_ptr, row, M, stride_x)
    w_rows = row_starts(w_ptr, col, N, stride_w)
    lane = tl.arange(0, BLOCK_K)
    k_start, k_stop = slice_bounds(k_chunk, K, SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        if TMA:
            a = x_desc.load([first_row, k0])
            b = w_desc.load([first_col, k0])
        else:
            kk = k0 + lane
            a = load_k(x_rows[:, None] + kk[None, :], (kk < K)[None, :], EVEN_K)
            b = load_k(w_rows[:, None] + kk[None, :], (kk < K)[None, :], EVEN_K)
        if DOT_UPCAST:                             # the interpreter's bf16 dot is wrong: fp32 there
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SPLIT:
        store_tile(part_ptr + tl.program_id(1).to(tl.int64) * M * N, N, row, col, M, N, acc)
    else:
        if STATS_ROWS > 0:
            steps = tl.cdiv(tl.minimum(M - first_row, BLOCK_M), STATS_ROWS)
            while tl.atomic_add(count_ptr + first_row // BLOCK_M, 0, sem="acquire", scope="gpu") < steps:
                pass
            tl.debug_barrier()                     # the count seen (acquire), then every thread's loads
        # past L1: the stats may have been written by a kernel running beside this one
        mean = tl.load(stats_ptr + row, mask=row < M, other=0.0, cache_modifier=".cg")
        rstd = tl.load(stats_ptr + M + row, mask=row < M, other=0.0, cache_modifier=".cg")
        store_projected(y_ptr, stride_y, row, col, M, N, acc, mean, rstd, sums_ptr)


@triton.jit
def folded_split_finish_kernel(x_ptr, part_ptr, sums_ptr, y_ptr, M, N, K, n_split, stride_x, stride_y, eps,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               STAGES: tl.constexpr):
    """y for [BLOCK_M, BLOCK_N] of the split folded gemm: the rows' (mean, rstd) read from x here (every
    column block reads its rows again, from L2: few rows take this path), the K slices' parts added."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mean, rstd = row_mean_rstd(row_starts(x_ptr, row, M, stride_x), K, eps, BLOCK_K, STAGES)
    ok = (row < M)[:, None] & (col < N)[None, :]
    parts = part_ptr + row.to(tl.int64)[:, None] * N + col[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(n_split):                       # few rows: M * N stays in int32
        acc += tl.load(parts, mask=ok, other=0.0)
        parts += M * N
    store_projected(y_ptr, stride_y, row, col, M, N, acc, mean, rstd, sums_ptr)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def prev_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << (max(1, n).bit_length() - 1)


def contiguous_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An optional 1-D parameter with unit stride (kernels index it as ptr + k)."""
    return None if t is None else t.contiguous()


@functools.lru_cache(maxsize=1024)
def rows_config(M: int, N: int, K: int, n_sm: int, itemsize: int) -> dict:
    """Block sizes of the rows kernel (and the router), aiming at ~2 programs per SM. Cached (the
    launch path is latency at small M): callers must not modify the dict.

    N <= ROWS_MAX_N: one column block, so x is read once; rows per program grow with M (the
    weight tile is re-read from L2 once per row block). Blocks of 16+ rows use tl.dot, fewer rows
    a broadcast product in fp32 registers (no operand rounding).
    """
    block_n = pow2(N)
    block_m = min(32, pow2(M), prev_pow2(M // (2 * n_sm)))
    # the broadcast product [BM, BN, BK] must leave K steps of 64+ values (128-byte rows); wide
    # tiles take tl.dot instead where there are 16 rows to fill one, else fewer rows per program
    use_dot = block_m >= 16 or (M >= 16 and TILE_BUDGET // (block_m * block_n) < 64)
    if use_dot:
        block_m, block_n = max(16, block_m), max(16, block_n)
        block_k = min(256 // itemsize, TILE_BUDGET // block_n)      # 256-byte row segments per step
    else:
        block_m = max(1, min(block_m, TILE_BUDGET // (16 * block_n)))
        block_k = min(2048 // itemsize, TILE_BUDGET // (block_m * block_n))   # fp32: 512 (1024 spills on sm_120)
    block_k = max(16, min(block_k, pow2(K)))
    widest = (max(block_m, block_n) if use_dot else block_m * block_n) * block_k   # fp32 values per step
    stages = 3 if 3 * (block_m + block_n) * block_k * itemsize <= ROWS_STAGE_BYTES else 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, USE_DOT=use_dot,
                STAGES=stages, num_warps=max(4, min(8, widest // 1024)))


# ---------------------------------------------------------------------------------------------
# gemm configs: the shipped JSON for this device (tuning.py), else a table by M bucket and family
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    """The gemm kernels' tiling (the tunable part of the large-N path)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int          # row blocks that sweep the column blocks together (W tiles stay in L2)
    num_warps: int
    num_stages: int


# float32 from 17 rows (the pivot path, its dot in tf32x3): tiles by family, then by M, not tuned. On the
# H200 (perf/ln_fp32_tf32x3.py, ln_fp32_tf32x3.txt; K split by gemm_split) 64 x 128 x 32 at 4 warps took
# 102-109 us at 17-64 rows and 128 x 128 x 32 at 8 warps 141-142 at 96-128, 267 at 256 and 1039 at 1024,
# the fastest of five tiles. On sm_100 and sm_120, which no run here reaches, the tiles are the
# fastest sm_90 tiles that compile there without spills (offline_builds; 64 x 128 x 32 at 4 warps
# spills on both, 128 x 128 x 32 on sm_120).
GEMM_FP32 = {"sm_90": ((64, GemmConfig(64, 128, 32, 8, 4, 3)), (None, GemmConfig(128, 128, 32, 8, 8, 4))),
             "sm_100": ((64, GemmConfig(64, 128, 16, 8, 4, 4)), (None, GemmConfig(128, 128, 32, 8, 8, 4))),
             "sm_120": ((None, GemmConfig(64, 128, 16, 8, 4, 4)),)}
GEMM_FP32["generic"] = GEMM_FP32["sm_120"]      # mma.sync dots and 99 KB, as on sm_120


def gemm_fp32_config(M: int, family: str) -> GemmConfig:
    """The float32 gemm's tile for M rows on a family (GEMM_FP32)."""
    return next(cfg for most, cfg in GEMM_FP32[family] if most is None or M <= most)


# the few-rows kernel's (BLOCK_N, BLOCK_K, warps) by rows (a power of two): the fastest of 2-3 tilings at
# each on the H100 (ln_fp32_few.txt), except at 16 rows, where 16 x 64 (74-78 against 79-82 us) spills on
# sm_120 under triton 3.6; 32-64 registers of products a thread. From 17 rows the gemm is faster (H200:
# 107 us at 24 rows against 217, ln_fp32_tf32x3.txt).
FEW_ROWS_TILES = {1: (16, 256, 4), 2: (16, 128, 4), 4: (16, 64, 4), 8: (16, 64, 4), 16: (32, 32, 8)}


def few_rows_config(M: int) -> dict:
    """The few-rows kernel's launch constants for M <= FEW_ROWS_MAX_M rows (all of them in one block)."""
    block_m = pow2(M)
    block_n, block_k, warps = FEW_ROWS_TILES[block_m]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=3, num_warps=warps)


def gemm_bucket(M: int) -> str:
    """Rows rounded up to a power of two: the key the gemm's configs are stored under."""
    return tuning.pow2_bucket(M=M)


def gemm_shared(config: GemmConfig, itemsize: int = 2) -> int:
    """Shared memory a config asks for: its pipeline's tiles plus headroom for the epilogue's
    layout conversion (an upper estimate; offline_builds reads the real figure)."""
    return tuning.smem_gemm(config.block_m, config.block_n, config.block_k, config.num_stages,
                            itemsize) + EPILOGUE_SHARED


def fit_shared(config: GemmConfig, limit: int, itemsize: int = 2) -> GemmConfig:
    """Stages, then BLOCK_N, cut until the config fits `limit` bytes of shared memory."""
    while gemm_shared(config, itemsize) > limit and config.block_n > 16:
        if config.num_stages > 2:
            config = replace(config, num_stages=config.num_stages - 1)
        else:
            config = replace(config, block_n=config.block_n // 2)
    return config


def gemm_fallback(bucket: str, family: str) -> GemmConfig:
    """The 16-bit gemm's built-in config: tiles by M bucket and GPU family (a heuristic table, no
    timing), cut to fit the family's shared memory. Every one compiles without spills for sm_90,
    sm_100, sm_120 and (the generic family) sm_80 (offline_builds)."""
    M = int(bucket.removeprefix("M"))
    # up to 128 rows the gemm is bound by the weight's read and K is split (gemm_split). Three tiles at
    # 8320 x 4096 (ln_few_rows.txt): at 1-8 rows 64x128x64 (H200 26 us against 34-36 for 64x64x128;
    # H100 within 1.3 us of the best); at 32-128 rows 64x64x128 (H100 32-37 against 34-41; H200
    # within 0.3 us of the best)
    if M <= 16:
        config = GemmConfig(64, 128, 64, 8, 4, 4)
    elif M <= 128:
        config = GemmConfig(64, 64, 128, 8, 4, 4)
    elif M <= 512 or family != "sm_90":
        config = GemmConfig(128, 128, 64, 8, 8, 4)
    else:                              # Hopper wgmma: the widest tile whose accumulator fits 8 warps;
        # H200 tuner, 8192 x 8320 x 4096 with the stats pass (tune-log-layernorm_linear.jsonl):
        # 0.875-0.888 ms, level with 128 x 256 (0.871, the shipped H200 entry)
        config = GemmConfig(256, 128, 64, 8, 8, 4)
    return fit_shared(config, tuning.SHARED_LIMIT[family])


def gemm_from_json(entry: dict) -> GemmConfig:
    return GemmConfig(**entry)


def pick_gemm_config(M: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The tuned entry of M's bucket for this device, else the fallback; both cut to the device's
    own shared memory where it has less than its family (a no-op on sm_90, sm_100 and sm_120)."""
    if dtype == torch.float32:
        config = gemm_fp32_config(M, tuning.device_family(device))
    else:
        config = tuning.config_for("layernorm_linear", gemm_bucket(M), gemm_fallback, gemm_from_json)
    return fit_shared(config, max_shared_memory(device), dtype.itemsize)


def gemm_constexprs(config: GemmConfig) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                STAGES=config.num_stages)


def _k_slices(slices: int, K: int, block_k: int) -> tuple[int, int]:
    """(slices, k_chunk): K cut into about `slices` slices of whole BLOCK_K steps."""
    k_chunk = triton.cdiv(triton.cdiv(K, min(max(1, slices), triton.cdiv(K, block_k))), block_k) * block_k
    return triton.cdiv(K, k_chunk), k_chunk


def _k_split(blocks: int, K: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(slices, k_chunk) of the rows kernel: a grid of fewer programs than SMs splits K until ~2
    programs per SM."""
    n_sm = sm_count(device)
    return _k_slices(1 if blocks >= n_sm else triton.cdiv(2 * n_sm, blocks), K, block_k)


def _plan_key(x: torch.Tensor, N: int, params: tuple, eps: float) -> tuple:
    """What a launch plan of either path depends on besides its parameters' stamps (launch_plans.py)."""
    return (x.device.index, current_stream(x.device), tuning.generation(), *x.shape, N, x.stride(0), x.dtype,
            x.data_ptr() % 16, *map(id, params), eps)


def split_parts(slices: int, M: int, N: int, device: torch.device) -> tuple:
    """The per-slice partial sums of a K-split launch, in fp32: acc [S, M, N] and row sums [S, 2, M]."""
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty((slices, M, N), **f32), torch.empty((slices, 2, M), **f32)


def _row_parts(slices: int, M: int, N: int, y: torch.Tensor) -> tuple:
    """The rows kernel's per-slice partial sums (split_parts, and column sums [S, 2, N]) where K is
    split, else y three times (never touched)."""
    if slices == 1:
        return y, y, y
    return *split_parts(slices, M, N, y.device), torch.empty((slices, 2, N), dtype=torch.float32, device=y.device)


def _launch_rows(x, ln_weight, ln_bias, weight, bias, y, eps):
    """y = layernorm_linear(x) for 2-D x through the rows kernel, and its finish kernel where K is
    split; a repeated eager call launches the plans its first call kept (launch_plans.py)."""
    M, K = x.shape
    N = weight.shape[0]
    params = (ln_weight, ln_bias, weight, bias)
    planned = plans_apply(x.device)
    if planned:
        key = _plan_key(x, N, params, eps)
        rows_plan, finish_plan = _ROWS_PLANS.find(key, params), _FINISH_PLANS.find(key, params)
        if rows_plan is not None and (rows_plan.extra == 1 or finish_plan is not None):
            parts = _row_parts(rows_plan.extra, M, N, y)
            rows_plan.launch(x, y, *parts)
            if rows_plan.extra > 1:
                finish_plan.launch(*parts, y)
            return
    g, b, w, bias = contiguous_vector(ln_weight), contiguous_vector(ln_bias), rows(weight), contiguous_vector(bias)
    cfg = rows_config(M, N, K, sm_count(x.device), x.element_size())
    blocks = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    slices, k_chunk = _k_split(blocks[0] * blocks[1], K, cfg["BLOCK_K"], x.device)
    parts = _row_parts(slices, M, N, y)
    # an absent vector's pointer (never read) is the weight's: a plan must keep no call's tensor
    grid = (*blocks, slices)
    args = (x, g if g is not None else w, b if b is not None else w, w, bias if bias is not None else w, y, *parts,
            M, N, K, k_chunk, x.stride(0), w.stride(0), y.stride(0), eps)
    kwargs = dict(HAS_GAMMA=g is not None, HAS_BETA=b is not None, HAS_BIAS=bias is not None, SPLIT=slices > 1,
                  DOT_UPCAST=dot_upcast(x), PRECISION=dot_precision(x.dtype), **cfg)
    compiled = layernorm_linear_rows_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION)
    if planned:
        _ROWS_PLANS.record(key, params, compiled, grid, args, kwargs, extra=slices,
                           slots=("x_ptr", "y_ptr", "acc_part_ptr", "stat_part_ptr", "col_part_ptr"))
    if slices > 1:
        finish_launch = launch_finish(*parts, bias if bias is not None else w, y, K, eps, has_bias=bias is not None)
        if planned:
            _FINISH_PLANS.record(key, params, *finish_launch,
                                 slots=("acc_part_ptr", "stat_part_ptr", "col_part_ptr", "y_ptr"))


def launch_finish(acc_part, stat_part, col_part, bias, y, K, eps, has_bias=False) -> tuple:
    """y <- the K slices' partial sums added up (layernorm_linear_finish_kernel): col_part [S, 2, N]
    from the rows kernel, or the gemm's cached [2, N] sums (bias included). Returns the launch as
    LaunchPlans.record takes it."""
    M, N = y.shape
    block_m, block_n = min(16, pow2(M)), min(128, pow2(N))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    args = (acc_part, stat_part, col_part, bias, y, M, N, K, acc_part.shape[0], y.stride(0), eps)
    kwargs = dict(HAS_BIAS=has_bias, COL_PARTS=col_part.dim() == 3, BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=4)
    return layernorm_linear_finish_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


# weight -> (stamp of (weight, ln_weight, ln_bias, bias), [2, N] fp32 sums, folded weight or None);
# entries die with the weight
_WEIGHT_SUMS = WeakTensorKeyDictionary()


def folds_weight(weight: torch.Tensor) -> bool:
    """16-bit weights take the folded gemm (W * gamma cached); float32 keeps the pivot path."""
    return weight.dtype != torch.float32


def weight_sums(weight, ln_weight, ln_bias, bias) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([2, N] fp32 (W' 1, W @ beta + bias), W' = W * gamma in W's dtype, or None where the gemm
    uses W itself (float32, or no gamma)); cached until any of the four tensors changes."""
    key = (weight, ln_weight, ln_bias, bias)
    cached = _WEIGHT_SUMS.get(weight)
    if cached is not None and same_stamp(cached[0], key):
        return cached[1], cached[2]
    w = rows(weight)
    N, K = w.shape
    g, b, bias = contiguous_vector(ln_weight), contiguous_vector(ln_bias), contiguous_vector(bias)
    fold = g is not None and folds_weight(w)
    sums = torch.empty((2, N), dtype=torch.float32, device=w.device)
    folded = torch.empty((N, K), dtype=w.dtype, device=w.device) if fold else None
    block_n, block_k = 16, min(512, pow2(K, 16))
    weight_sums_kernel[(triton.cdiv(N, block_n),)](
        w, g if g is not None else w, b if b is not None else w, bias if bias is not None else w, sums,
        folded if fold else sums, N, K, w.stride(0), HAS_GAMMA=g is not None, HAS_BETA=b is not None,
        HAS_BIAS=bias is not None, FOLD=fold, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=FP_FUSION)
    stamp = version_stamp(key)
    if stamp is not None:
        _WEIGHT_SUMS[weight] = (stamp, sums, folded)
    return sums, folded


# row_stats: 4096 two-warp programs at M = 8192, 16 values per thread, loads 4 deep (H200, 8192 x 8320:
# 0.045 ms against 0.059 unpipelined, the fastest of eight tilings in ln_stats_pass.txt)
STATS_BLOCK_M, STATS_BLOCK_K, STATS_STAGES, STATS_WARPS = 2, 512, 4, 2
# beside the gemm: one program an SM walking the rows; 8 warps hid the pass best (ln_stats_beside.txt)
BESIDE_WARPS = 8


def launch_row_stats(x: torch.Tensor, stats: torch.Tensor, eps: float, counts: Optional[torch.Tensor] = None,
                     count_block: int = 0) -> tuple:
    """stats [2, M] fp32 <- (mean, rstd) of each row of x [M, K] (row_stats_kernel); with counts (one
    int32 a row block of count_block rows, zeroed) the pass beside the gemm: one program an SM.
    Returns the launch as LaunchPlans.record takes it: (compiled kernel, grid, args, kwargs)."""
    grid, args, kwargs = row_stats_args(x, stats, eps, counts, count_block)
    return row_stats_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


def row_stats_args(x, stats, eps, counts=None, count_block=0) -> tuple:
    """launch_row_stats's (grid, args, kwargs), launching nothing."""
    M, K = x.shape
    steps = triton.cdiv(M, STATS_BLOCK_M)
    beside = counts is not None
    grid = (min(steps, sm_count(x.device)) if beside else steps,)
    args = (x, stats, counts if beside else stats, M, K, x.stride(0), eps)
    kwargs = dict(COUNT_BLOCK=count_block if beside else 0, PDL=beside and x.is_cuda, BLOCK_M=STATS_BLOCK_M,
                  BLOCK_K=min(STATS_BLOCK_K, pow2(K)), STAGES=STATS_STAGES,
                  num_warps=BESIDE_WARPS if beside else STATS_WARPS)
    return grid, args, kwargs


def gemm_split(M: int, N: int, K: int, cfg: GemmConfig, device: torch.device) -> tuple[int, int]:
    """(slices, k_chunk) of the 16-bit gemm: few rows leave most SMs without a tile (32 tiles at 1-64
    rows x 4096 columns), and the weight is read at the pace of the SMs that hold one, so K is split
    into as many slices as keep the programs within one per SM. Where half the SMs or more hold a
    tile it is not: a split pays there only while every program stays resident (H100, ln_few_rows.txt:
    128 tiles of 64x64x128 at 128 rows took 41 us split in two against 36 whole, 128 of 64x128x64 at
    256 rows 49 against 52), and the tuned 256-row tiles fit one program an SM."""
    blocks = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    n_sm = sm_count(device)
    return _k_slices(1 if 2 * blocks > n_sm else n_sm // blocks, K, cfg.block_k)


def launch_folded_gemm(x, folded, stats, sums, y, cfg: GemmConfig, slices: int = 1, k_chunk: int = 0,
                       part: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> tuple:
    """y [M, N] <- the 16-bit gemm on x [M, K] and W' = folded [N, K], with the rows' stats
    (launch_row_stats) and the weight's sums (weight_sums); tiles through TMA where it applies.
    counts: the statistics pass runs beside this gemm (launch_row_stats with the same counts and
    count_block = cfg.block_m, launched just before): the tiles wait for their rows' counts, and on
    a GPU the gemm is launched with programmatic dependent launch.
    slices > 1: the K slices' raw products go to part [slices, M, N] instead (stats and y unused;
    launch_split_finish writes y). Returns (compiled kernel, grid, args, kwargs, x's descriptor block
    or None)."""
    grid, args, kwargs, x_block = folded_gemm_args(x, folded, stats, sums, y, cfg, slices, k_chunk, part, counts)
    compiled = layernorm_linear_folded_gemm_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION)
    return compiled, grid, args, kwargs, x_block


def folded_gemm_args(x, folded, stats, sums, y, cfg: GemmConfig, slices=1, k_chunk=0, part=None,
                       counts=None) -> tuple:
    """launch_folded_gemm's (grid, args, kwargs, x's descriptor block or None), launching nothing."""
    M, K = x.shape
    N = folded.shape[0]
    tma = tma_ok(x, folded)
    x_block = [cfg.block_m, cfg.block_k] if tma else None
    x_desc, w_desc = x, folded
    if tma:
        x_desc = TensorDescriptor.from_tensor(x, x_block)
        w_desc = TensorDescriptor.from_tensor(folded, [cfg.block_n, cfg.block_k])
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), slices)
    # an unused pointer is the sums': a plan keeps no call's tensor
    args = (x, folded, x_desc, w_desc, stats, sums if counts is None else counts, sums, y,
            sums if part is None else part, M, N, K, k_chunk or K, x.stride(0), folded.stride(0), y.stride(0))
    kwargs = dict(TMA=tma, EVEN_K=K % cfg.block_k == 0, DOT_UPCAST=dot_upcast(x), SPLIT=slices > 1,
                  STATS_ROWS=0 if counts is None else STATS_BLOCK_M, **gemm_constexprs(cfg), num_warps=cfg.num_warps)
    if counts is not None and x.is_cuda:
        kwargs["launch_pdl"] = True
    return grid, args, kwargs, x_block


def share_an_sm(kernels, device: torch.device) -> bool:
    """Whether one SM holds a program of each compiled kernel at once: registers (allocated 256 to a
    warp at a time), shared memory (plus the 1 KB the driver keeps for each program) and threads."""
    regs = shared = threads = 0
    for kernel in kernels:
        kernel._init_handles()
        warps = kernel.metadata.num_warps
        regs += warps * triton.cdiv(kernel.n_regs * 32, 256) * 256
        shared += kernel.metadata.shared + 1024
        threads += 32 * warps
    return regs <= max_registers(device) and shared <= sm_shared_memory(device) and threads <= sm_threads(device)


def beside_counts(M: int, count_block: int, device: torch.device) -> torch.Tensor:
    """The statistics pass's finished steps, by row block of the gemm: zeroed each call (a fill a
    CUDA graph replays), never carried over."""
    return torch.zeros(triton.cdiv(M, count_block), dtype=torch.int32, device=device)


_BESIDE_FITS: dict = {}       # whether the statistics pass fits beside the gemm, by what its compiles hang on


def stats_beside(x, folded, stats, sums, y, eps, cfg: GemmConfig) -> bool:
    """Whether the statistics pass can run beside the gemm of cfg on this device (compiling both, not
    launching). An SM must hold a gemm tile and a statistics program at once (share_an_sm: on sm_90
    the 128 x 256 tile does, 256 x 128 takes 248-250 registers a thread and does not), and the
    driver must take the statistics kernel's call for all of an SM's shared memory
    (prefer_all_shared): an SM it configured for that kernel's 6 KB would take no gemm tile until
    its statistics program left. True under the interpreter (nothing to read, one program at a time);
    False before sm_90, which has no programmatic dependent launch (griddepcontrol does not assemble)."""
    if INTERPRET:
        return True
    if torch.cuda.get_device_capability(x.device)[0] < PDL_MIN_MAJOR:
        return False
    K = x.shape[1]
    key = (x.device, x.dtype, cfg, tma_ok(x, folded), K % cfg.block_k == 0, K % 16 == 0, min(STATS_BLOCK_K, pow2(K)))
    if key not in _BESIDE_FITS:
        counts = torch.empty(1, dtype=torch.int32, device=x.device)
        grid, args, kwargs = row_stats_args(x, stats, eps, counts, cfg.block_m)
        stats_kernel = row_stats_kernel.warmup(*args, grid=grid, **kwargs)
        grid, args, kwargs, _ = folded_gemm_args(x, folded, stats, sums, y, cfg, counts=counts)
        gemm_kernel = layernorm_linear_folded_gemm_kernel.warmup(*args, grid=grid, **kwargs)
        try:
            fits = share_an_sm((stats_kernel, gemm_kernel), x.device) and prefer_all_shared(stats_kernel)
        except AttributeError:         # a Triton whose compiled kernels say less: the pass goes first
            fits = False
        _BESIDE_FITS[key] = fits
    return _BESIDE_FITS[key]


# split finish: two rows and 512 columns a program (128 programs at 32 rows x 4096), each row's stats
# read as row_stats_kernel reads them
FINISH_BLOCK_N, FINISH_WARPS = 512, 4


def launch_split_finish(x, part, sums, y, eps) -> tuple:
    """y <- LayerNorm's projection of the split gemm's parts (folded_split_finish_kernel); returns the
    launch as LaunchPlans.record takes it."""
    M, K = x.shape
    N = y.shape[1]
    grid = (triton.cdiv(M, STATS_BLOCK_M), triton.cdiv(N, FINISH_BLOCK_N))
    args = (x, part, sums, y, M, N, K, part.shape[0], x.stride(0), y.stride(0), eps)
    kwargs = dict(BLOCK_M=STATS_BLOCK_M, BLOCK_N=FINISH_BLOCK_N, BLOCK_K=min(STATS_BLOCK_K, pow2(K)),
                  STAGES=STATS_STAGES, num_warps=FINISH_WARPS)
    return folded_split_finish_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


def _launch_gemm(x, ln_weight, ln_bias, weight, bias, y, eps, config: Optional[GemmConfig] = None,
                 beside: Optional[bool] = None):
    """y = layernorm_linear(x) for 2-D x at wide N; `config` None uses pick_gemm_config. 16-bit: the
    stats pass and the gemm, the pass beside the gemm where it fits (stats_beside; `beside` True or
    False forces the choice), or where K is split (gemm_split) the gemm and the finish; float32:
    _launch_fp32."""
    M, K = x.shape
    N = weight.shape[0]
    params = (ln_weight, ln_bias, weight, bias)
    planned = config is None and plans_apply(x.device)
    if planned:
        key = _plan_key(x, N, params, eps)
        if _launch_planned_gemm(key, params, x, y):
            return
    sums, folded = weight_sums(weight, ln_weight, ln_bias, bias)
    w = folded if folded is not None else rows(weight)
    if not folds_weight(w):
        _launch_fp32(x, contiguous_vector(ln_weight), w, sums, y, eps, config, key if planned else None, params)
        return
    cfg = config or pick_gemm_config(M, x.dtype, x.device)
    slices, k_chunk = gemm_split(M, N, K, cfg, x.device)
    if slices == 1:
        stats = torch.empty((2, M), dtype=torch.float32, device=x.device)
        if beside is None:
            beside = stats_beside(x, w, stats, sums, y, eps, cfg)
        counts = beside_counts(M, cfg.block_m, x.device) if beside else None
        stats_launch = launch_row_stats(x, stats, eps, counts, cfg.block_m)
        *gemm_launch, x_block = launch_folded_gemm(x, w, stats, sums, y, cfg, counts=counts)
        if planned:
            _STATS_PLANS.record(key, params, *stats_launch, slots=("x_ptr", "stats_ptr", "count_ptr"))
            slots = ("x_ptr", "x_desc", "stats_ptr", "y_ptr") + (("count_ptr",) if beside else ())
            _GEMM_PLANS.record(key, params, *gemm_launch, slots=slots, extra=(1, x_block, cfg.block_m if beside else 0))
        return
    part = torch.empty((slices, M, N), dtype=torch.float32, device=x.device)
    # the unused stats and y pointers are the sums and the weight: a plan keeps no call's tensor
    *gemm_launch, x_block = launch_folded_gemm(x, w, sums, sums, w, cfg, slices, k_chunk, part)
    finish_launch = launch_split_finish(x, part, sums, y, eps)
    if planned:
        _GEMM_PLANS.record(key, params, *gemm_launch, slots=("x_ptr", "x_desc", "part_ptr"),
                           extra=(slices, x_block, 0))
        _SPLIT_FINISH_PLANS.record(key, params, *finish_launch, slots=("x_ptr", "part_ptr", "y_ptr"))


def launch_fp32_gemm(x, g, w, sums, y, eps, cfg: GemmConfig, slices: int = 1, k_chunk: int = 0,
                     parts: Optional[tuple] = None) -> tuple:
    """y [M, N] <- the float32 gemm on x [M, K] and W [N, K] with the weight's sums (weight_sums);
    slices > 1: the K slices' partial sums go to parts (split_parts) instead, for launch_finish.
    Returns the launch as LaunchPlans.record takes it."""
    M, K = x.shape
    N = w.shape[0]
    acc_part, stat_part = parts or (sums, sums)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), slices)
    # an absent gamma's pointer (never read) is the weight's: a plan must keep no call's tensor
    args = (x, g if g is not None else w, w, sums, y, acc_part, stat_part, M, N, K, k_chunk or K, x.stride(0),
            w.stride(0), y.stride(0), eps)
    kwargs = dict(HAS_GAMMA=g is not None, EVEN_K=K % cfg.block_k == 0, PRECISION=gemm_precision(x.dtype, x.device),
                  SPLIT=slices > 1, **gemm_constexprs(cfg), num_warps=cfg.num_warps)
    return layernorm_linear_gemm_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


def launch_few_rows(x, g, w, parts: tuple, k_chunk: int) -> tuple:
    """parts (split_parts) <- the few-rows kernel's K slices (k_chunk columns each) for x [M <=
    FEW_ROWS_MAX_M, K] and W [N, K]; returns the launch as LaunchPlans.record takes it."""
    M, K = x.shape
    N = w.shape[0]
    cfg = few_rows_config(M)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), parts[0].shape[0])
    args = (x, g if g is not None else w, w, *parts, M, N, K, k_chunk, x.stride(0), w.stride(0))
    kwargs = dict(HAS_GAMMA=g is not None, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
    return layernorm_linear_few_rows_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


def few_rows_split(M: int, N: int, K: int, device_sms: int) -> tuple[int, int]:
    """(slices, k_chunk) of the few-rows kernel: K cut until about FEW_ROWS_WARPS warps an SM (at 8320 x
    4096 on 132 SMs: 2 slices; ln_fp32_few.txt)."""
    cfg = few_rows_config(M)
    programs = triton.cdiv(N, cfg["BLOCK_N"]) * cfg["num_warps"]
    return _k_slices(max(1, FEW_ROWS_WARPS * device_sms // programs), K, cfg["BLOCK_K"])


def _launch_fp32(x, g, w, sums, y, eps, config: Optional[GemmConfig], key, params) -> None:
    """float32 through the few-rows kernel (up to FEW_ROWS_MAX_M rows, unless `config` forces a gemm
    tile) or the gemm, whole or K-split (gemm_split), with the finish where there are parts; plans
    kept under `key` (None: none). A plan's extra is its parts' slice count, 0 where it writes y."""
    M, K = x.shape
    N = w.shape[0]
    if config is None and M <= FEW_ROWS_MAX_M:
        slices, k_chunk = few_rows_split(M, N, K, sm_count(x.device))
        parts = split_parts(slices, M, N, x.device)
        table, launch = _FEW_ROWS_PLANS, launch_few_rows(x, g, w, parts, k_chunk)
    else:
        cfg = config or pick_gemm_config(M, x.dtype, x.device)
        slices, k_chunk = gemm_split(M, N, K, cfg, x.device)
        parts = split_parts(slices, M, N, x.device) if slices > 1 else None
        table, launch = _FP32_GEMM_PLANS, launch_fp32_gemm(x, g, w, sums, y, eps, cfg, slices, k_chunk, parts)
    if key is not None:
        slots = ("x_ptr", "acc_part_ptr", "stat_part_ptr") if parts else ("x_ptr", "y_ptr")
        table.record(key, params, *launch, slots=slots, extra=slices if parts else 0)
    if parts:                          # the bias is in the sums: the weight stands in for its pointer
        finish_launch = launch_finish(*parts, sums, w, y, K, eps)
        if key is not None:
            _FINISH_PLANS.record(key, params, *finish_launch, slots=("acc_part_ptr", "stat_part_ptr", "y_ptr"))


def _launch_planned_gemm(key, params, x, y) -> bool:
    """Launches the gemm path's plans for `key` if all are kept; False if not."""
    fp32_plan = _FEW_ROWS_PLANS.find(key, params) or _FP32_GEMM_PLANS.find(key, params)
    if fp32_plan is not None:
        if fp32_plan.extra == 0:
            fp32_plan.launch(x, y)
            return True
        finish_plan = _FINISH_PLANS.find(key, params)
        if finish_plan is None:
            return False
        parts = split_parts(fp32_plan.extra, *y.shape, x.device)
        fp32_plan.launch(x, *parts)
        finish_plan.launch(*parts, y)
        return True
    gemm_plan = _GEMM_PLANS.find(key, params)
    if gemm_plan is None:
        return False
    slices, x_block, count_block = gemm_plan.extra
    other_plan = (_STATS_PLANS if slices == 1 else _SPLIT_FINISH_PLANS).find(key, params)
    if other_plan is None:
        return False
    x_desc = TensorDescriptor.from_tensor(x, x_block) if x_block else x
    M, N = y.shape
    if slices == 1:
        stats = torch.empty((2, M), dtype=torch.float32, device=x.device)
        if count_block:
            counts = beside_counts(M, count_block, x.device)
            other_plan.launch(x, stats, counts)
            gemm_plan.launch(x, x_desc, stats, y, counts)
        else:
            other_plan.launch(x, stats, stats)
            gemm_plan.launch(x, x_desc, stats, y)
    else:
        part = torch.empty((slices, M, N), dtype=torch.float32, device=x.device)
        gemm_plan.launch(x, x_desc, part)
        other_plan.launch(x, part, y)
    return True


# eager launches at a repeated call (launch_plans.py): the rows kernel and its finish, float32's
# few-rows kernel or gemm (and the same finish where there are parts), the 16-bit gemm path's
# statistics pass and gemm, or its split gemm and finish
_ROWS_PLANS = LaunchPlans(layernorm_linear_rows_kernel)
_FINISH_PLANS = LaunchPlans(layernorm_linear_finish_kernel)
_FP32_GEMM_PLANS = LaunchPlans(layernorm_linear_gemm_kernel)
_FEW_ROWS_PLANS = LaunchPlans(layernorm_linear_few_rows_kernel)
_STATS_PLANS = LaunchPlans(row_stats_kernel)
_GEMM_PLANS = LaunchPlans(layernorm_linear_folded_gemm_kernel)
_SPLIT_FINISH_PLANS = LaunchPlans(folded_split_finish_kernel)
PLAN_TABLES = (_ROWS_PLANS, _FINISH_PLANS, _FP32_GEMM_PLANS, _FEW_ROWS_PLANS, _STATS_PLANS, _GEMM_PLANS,
               _SPLIT_FINISH_PLANS)


def launch_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps):
    x2 = rows(x)
    M, N = x2.shape[0], weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        pass
    elif N <= ROWS_MAX_N:
        _launch_rows(x2, ln_weight, ln_bias, weight, bias, y, eps)
    else:
        _launch_gemm(x2, ln_weight, ln_bias, weight, bias, y, eps)
    return y.reshape(*x.shape[:-1], N)


def divisible_args(**values) -> tuple:
    """The int args that Triton's JIT would specialise as multiples of 16 for these values."""
    return tuple(name for name, value in values.items() if value % 16 == 0)


def pdl_targets(targets: tuple) -> tuple:
    """The targets a build that runs beside the statistics pass ships on (stats_beside)."""
    return tuple(cc for cc in targets if cc // 10 >= PDL_MIN_MAJOR)


def gemm_shipped_configs() -> list:
    """(label, config, compile targets) of every 16-bit gemm config a launcher can choose: each
    family's fallback (one M bucket per row of its table) and every entry of the shipped JSON."""
    configs = [(f"M{M}_sm{cc}", gemm_fallback(gemm_bucket(M), family), (cc,))
               for family, cc in tuning.FAMILY_CC.items() for M in (16, 128, 512, 8192)]
    configs += [(label, gemm_from_json(entry), targets)
                for targets, label, entry in tuning.shipped_entries("layernorm_linear")]
    return configs


def _gemm_builds(dt: str, types: dict, K: int) -> list:
    """The gemm at every config it ships with, N = 4096, whole and K-split (gemm_split): float32's
    tiles; each 16-bit config through pointers and, on the TMA families, through descriptors."""
    from .offline import KernelBuild
    divisible = divisible_args(M=8192, N=4096, K=K, k_chunk=2112, stride_x=K, stride_w=K, stride_y=4096)
    if dt == "fp32":                   # each family's tiles as pick_gemm_config cuts them to its shared memory
        return [KernelBuild(f"ln_linear_gemm_fp32_{cfg.block_m}x{cfg.block_n}_sm{cc}{'_split' if split else ''}",
                            layernorm_linear_gemm_kernel, types,
                            dict(HAS_GAMMA=True, PRECISION="tf32x3", EVEN_K=K % cfg.block_k == 0, SPLIT=split,
                                 **gemm_constexprs(fit_shared(cfg, tuning.SHARED_LIMIT[family], 4))),
                            num_warps=cfg.num_warps, uses_dot=True, targets=(cc,), divisible=divisible)
                for (family, cc), split in itertools.product(tuning.FAMILY_CC.items(), (False, True))
                for _, cfg in GEMM_FP32[family]]
    builds = []
    # each config whole and K-split; whole, also waiting for the statistics pass beside it (through
    # descriptors where the family has TMA, else pointers: the path it takes there)
    for (label, cfg, targets), (split, stats_rows) in itertools.product(
            gemm_shipped_configs(), ((False, 0), (True, 0), (False, STATS_BLOCK_M))):
        common = dict(EVEN_K=K % cfg.block_k == 0, DOT_UPCAST=False, SPLIT=split, STATS_ROWS=stats_rows,
                      **gemm_constexprs(cfg))
        name = f"ln_linear_gemm_{dt}_{label}{'_split' if split else ''}{'_beside' if stats_rows else ''}"
        targets = pdl_targets(targets) if stats_rows else targets
        tma_targets = tuple(cc for cc in targets if cc // 10 in TMA_FAMILIES)
        pointer_targets = tuple(cc for cc in targets if not stats_rows or cc not in tma_targets)
        if pointer_targets:
            pointers = {**types, "x_desc": f"*{dt}", "w_desc": f"*{dt}"}
            builds.append(KernelBuild(name, layernorm_linear_folded_gemm_kernel, pointers, dict(TMA=False, **common),
                                      num_warps=cfg.num_warps, uses_dot=True, targets=pointer_targets,
                                      divisible=divisible))
        if tma_targets:
            descs = {"x_desc": f"tensordesc<{dt}[{cfg.block_m}, {cfg.block_k}]>",
                     "w_desc": f"tensordesc<{dt}[{cfg.block_n}, {cfg.block_k}]>"}
            builds.append(KernelBuild(f"{name}_tma", layernorm_linear_folded_gemm_kernel,
                                      {**types, **descs}, dict(TMA=True, **common), num_warps=cfg.num_warps,
                                      uses_dot=True, targets=tma_targets, divisible=divisible))
    return builds


def offline_builds():
    from .offline import TARGETS, KernelBuild
    K = 8320
    builds = []
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        types = {**{n: "i32" for n in ("M", "N", "K", "k_chunk", "stride_x", "stride_w", "stride_y", "n_split")},
                 "eps": "fp32", **{n: f"*{dt}" for n in ("x_ptr", "g_ptr", "b_ptr", "w_ptr", "bias_ptr", "y_ptr")},
                 "folded_ptr": f"*{dt}", "count_ptr": "*i32",
                 **{n: "*fp32" for n in ("acc_part_ptr", "stat_part_ptr", "col_part_ptr", "sums_ptr", "stats_ptr",
                                         "part_ptr")}}
        flags = dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True, DOT_UPCAST=False, PRECISION="ieee")
        for M, N in ((32, 8), (8192, 8), (8192, 512)):
            cfg = dict(rows_config(M, N, K, n_sm=132, itemsize=dtype.itemsize))
            warps = cfg.pop("num_warps")
            divisible = divisible_args(M=M, N=N, K=K, k_chunk=cfg["BLOCK_K"], stride_x=K, stride_w=K, stride_y=N)
            for split in (False, True):
                builds.append(KernelBuild(f"ln_linear_rows_{dt}_M{M}_N{N}{'_split' if split else ''}",
                                          layernorm_linear_rows_kernel, types,
                                          {**flags, **cfg, "SPLIT": split},
                                          num_warps=warps, divisible=divisible))
        builds += [KernelBuild(f"ln_linear_finish_{dt}{'' if col_parts else '_sums'}", layernorm_linear_finish_kernel,
                               types, dict(HAS_BIAS=col_parts, COL_PARTS=col_parts, BLOCK_M=16, BLOCK_N=128))
                   for col_parts in (True, False)]
        builds.append(KernelBuild(f"ln_linear_weight_sums_{dt}", weight_sums_kernel, types,
                                  dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True, FOLD=dt != "fp32",
                                       BLOCK_N=16, BLOCK_K=512),
                                  divisible=divisible_args(N=4096, K=K, stride_w=K)))
        if dt == "fp32":
            for M in FEW_ROWS_TILES:
                cfg = dict(few_rows_config(M))
                warps = cfg.pop("num_warps")
                builds.append(KernelBuild(f"ln_linear_few_rows_M{M}", layernorm_linear_few_rows_kernel, types,
                                          dict(HAS_GAMMA=True, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg),
                                          num_warps=warps, divisible=divisible_args(N=4096, K=K, k_chunk=4160,
                                                                                    stride_x=K, stride_w=K)))
        else:
            builds.append(KernelBuild(f"ln_linear_split_finish_{dt}", folded_split_finish_kernel, types,
                                      dict(BLOCK_M=STATS_BLOCK_M, BLOCK_N=FINISH_BLOCK_N, BLOCK_K=STATS_BLOCK_K,
                                           STAGES=STATS_STAGES), num_warps=FINISH_WARPS,
                                      divisible=divisible_args(M=32, N=4096, K=K, stride_x=K, stride_y=4096)))
        builds += [KernelBuild(f"ln_linear_row_stats_{dt}{'_beside' if beside else ''}", row_stats_kernel, types,
                               dict(COUNT_BLOCK=128 if beside else 0, PDL=beside, BLOCK_M=STATS_BLOCK_M,
                                    BLOCK_K=STATS_BLOCK_K, STAGES=STATS_STAGES),
                               num_warps=BESIDE_WARPS if beside else STATS_WARPS,
                               divisible=divisible_args(M=8192, K=K, stride_x=K),
                               targets=pdl_targets(TARGETS) if beside else TARGETS)
                   for beside in (False, True)]
        builds += _gemm_builds(dt, types, K)
    return builds


# ---------------------------------------------------------------------------------------------
# op
# ---------------------------------------------------------------------------------------------
def _layernorm_linear(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                         weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    # float64 (oracle precision) keeps the reference: the kernels compute in fp32
    if use_triton(x) and x.dtype != torch.float64:
        return launch_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps)
    return reference._layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps)


_layernorm_linear_op = torch.library.custom_op("fused_ops::layernorm_linear", mutates_args=())(_layernorm_linear)


@_layernorm_linear_op.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def layernorm_linear(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, eps: float = 1e-5) -> torch.Tensor:
    """F.linear(F.layer_norm(x, (K,), ln_weight, ln_bias, eps), weight, bias) with fp32 statistics and
    accumulation; LayerNorm(x) is never written to memory. y [..., N] in x's dtype."""
    reference.check_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps)
    op = _layernorm_linear if skips_dispatcher(x, ln_weight, ln_bias, weight, bias) else _layernorm_linear_op
    return op(x, ln_weight, ln_bias, weight, bias, float(eps))
