"""fused_router: LayerNorm -> gate -> temperature softmax -> Laplace smoothing -> top-k, one launch.

Each program takes BLOCK_M rows and all E experts (E <= MAX_FUSED_E): it streams its rows of x
once (with the small gate weight, which stays in L2), builds the gate logits with the LayerNorm
folded in (layernorm_linear.py's algebra), then softmax, smoothing and top-k run on the
[BLOCK_M, E] logit tile in registers. Nothing but the k weights and indices is written.

Two ways through K, one finish:
- raw dot (16-bit x, narrow gates, many rows): x goes to tl.dot as loaded, against the cached
  operand W' = W * gamma split in two 16-bit halves (hi, lo interleaved as rows 2e and 2e + 1, so
  one dot of 2 * BLOCK_E columns carries both and ~2^-17 of W'). Products of 16-bit x are exact,
  so the logits keep fp32 accuracy while the registers only shift x by the row's pivot for the
  statistics. The pivot comes back in the finish: a @ W^T = x @ W'^T - pivot * (W' 1), with W' 1
  the sum of the rounded halves (cached beside them).
- pivot path (float32 x, few rows, wide gates): a = (x - pivot) * gamma in registers against W
  (layernorm_linear's ln_dot_sums: tl.dot tiles of 16+ rows, else a broadcast product).
Few rows split K over programs so the whole GPU streams x: each program writes its partial sums,
and the last of a row block's programs (an atomic counter) adds them up and finishes, still in
one launch. The counters reset themselves; each CUDA stream has its own, and a graph capture
takes fresh zeroed ones (captured with it).

gating="laplace" (FuseMoE's distance gate): logit_e = -||h - w_e|| with h = LN(x). From the same
pass, with v_e = w_e - beta and h = rstd * (a - d * gamma) + beta (a = (x - pivot) * gamma,
d = mean - pivot):
    ||h - w_e||^2 = rstd^2 ||a - d gamma||^2 - 2 rstd (a - d gamma) . v_e + ||v_e||^2
    ||a - d gamma||^2 = a.a - 2 d a.gamma + d^2 gamma.gamma
The row terms are sums of the K loop; the shift keeps d small, so nothing cancels but h ~ w_e
itself (clamped at 0 before the square root).
The terms that depend on the parameters alone (W' 1, W @ beta, v_e . gamma, ||v_e||^2,
gamma . gamma, and the W' halves) come from gate_sums_kernel, run once per version of
(gate weight, LN weight, LN bias) and cached: the K loop keeps only work on x (a first call, or
inference tensors, which keep no version, add that small launch). A CUDA graph captured after
the cache was filled holds the cached buffers: replays do not see later in-place changes of the
three parameters (capture again after changing them), and in-place writes through `.data` keep
the version, so no call sees those (a new tensor assigned to `.data` is seen: the stamp holds
the storage too).
Wider E computes the logits with the same helpers tiled over experts, then the unfused ops.

Accuracy of the raw dot: without the pivot inside the dot, x @ W'^T and pivot * W' 1 each round by
~2^-24 |mean| |W'|, against logits of size std |W'|. 16-bit x bounds |mean| / std (~2^8 for bf16
rows whose spread is a few units in the last place), a loss of ~2^-16 sqrt(K / BLOCK_K); a
constant row (std 0) gets rstd = 0, LayerNorm's exact answer (h = beta). (fp16: |mean| / std ~2^11,
a loss of ~2^-13 sqrt(K / BLOCK_K), and the halves carry ~2^-21 of W' instead of bf16's ~2^-17.)
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from . import reference, tuning
from ._runtime import FP_FUSION, dot_precision, dot_upcast, pow2, rows, skips_dispatcher, sm_count, use_triton
from .launch_plans import LaunchPlans, current_stream, plans_apply, same_stamp, version_stamp
from .layernorm_linear import (contiguous_vector, divisible_args, dot_nt, ln_dot_sums, ln_project,
                               ln_stats, load_affine, load_k, prev_pow2, row_pivot, row_starts, rows_config,
                               store_tile)
from .softmax import LOG2E, _laplace, _softmax_laplace_op
from .topk import _topk_gating_op, topk_tile

MAX_FUSED_E = 512      # widest expert row one program holds for softmax and top-k
NARROW_E = 8           # up to this many experts the router takes its own blocks (below), else rows_config's
RAW_DOT_ROWS_PER_SM = 1  # rows per SM from which narrow 16-bit gates take the raw dot
N_GATE_SUMS = 5        # rows of gate_sums_kernel's output
ROW_SUMS = tl.constexpr(4)   # partial row sums a K slice hands to the finishing program: s1, s2, aa, ag


@triton.jit
def gate_sums_kernel(w_ptr, g_ptr, b_ptr, sums_ptr, op_ptr, E, K, stride_w, HAS_GAMMA: tl.constexpr,
                     HAS_BETA: tl.constexpr, W_HALVES: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """sums [N_GATE_SUMS, E] fp32: W' 1 (W' = W * gamma), W @ beta, v_e . gamma, ||v_e||^2
    (v_e = w_e - beta) and gamma . gamma (in every column), for experts col.
    W_HALVES: also op[2e] = hi, op[2e + 1] = lo, with hi + lo = W'[e] to ~2^-17 (16-bit), and
    W' 1 adds up those rounded halves (the raw dot's pivot correction must match its operand)."""
    col = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    w_rows = row_starts(w_ptr, col, E, stride_w)
    wg = tl.zeros([BLOCK_E], tl.float32)
    wb = tl.zeros([BLOCK_E], tl.float32)
    vg = tl.zeros([BLOCK_E], tl.float32)
    vv = tl.zeros([BLOCK_E], tl.float32)
    gg = tl.zeros([BLOCK_K], tl.float32)
    lane = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + lane
        k_ok = kk < K
        w = tl.load(w_rows[:, None] + kk[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
        g, b = load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA, HAS_BETA, False)
        folded = w * g[None, :]
        if W_HALVES:
            hi = folded.to(op_ptr.dtype.element_ty)
            lo = (folded - hi.to(tl.float32)).to(op_ptr.dtype.element_ty)
            op = op_ptr + (2 * col).to(tl.int64)[:, None] * K + kk[None, :]
            op_ok = (col < E)[:, None] & k_ok[None, :]
            tl.store(op, hi, mask=op_ok)
            tl.store(op + K, lo, mask=op_ok)
            folded = hi.to(tl.float32) + lo.to(tl.float32)
        v = w - b[None, :]
        wg += tl.sum(folded, axis=1)
        wb += tl.sum(w * b[None, :], axis=1)
        vg += tl.sum(v * g[None, :], axis=1)
        vv += tl.sum(v * v, axis=1)
        gg += g * g
    ok = col < E
    tl.store(sums_ptr + col, wg, mask=ok)
    tl.store(sums_ptr + E + col, wb, mask=ok)
    tl.store(sums_ptr + 2 * E + col, vg, mask=ok)
    tl.store(sums_ptr + 3 * E + col, vv, mask=ok)
    tl.store(sums_ptr + 4 * E + col, tl.zeros([BLOCK_E], tl.float32) + tl.sum(gg, axis=0), mask=ok)


@triton.jit
def raw_dot_sums(x_rows, pivot, op_rows, g_ptr, b_ptr, k_start, k_stop, K, HAS_GAMMA: tl.constexpr,
                 HAS_BETA: tl.constexpr, DISTANCE: tl.constexpr, EVEN_K: tl.constexpr, DOT_UPCAST: tl.constexpr,
                 WAIT_DOT: tl.constexpr, STAGES: tl.constexpr, BLOCK_K: tl.constexpr):
    """The raw-dot pass over columns k_start:k_stop: (acc [BM, BB // 2] = x @ W'^T (minus a . beta for
    DISTANCE), s1, s2, aa, ag as in ln_dot_sums); op_rows point at the 2 * BLOCK_E interleaved
    (hi, lo) rows. The pivot is not taken out of acc (the finish does, once per row). WAIT_DOT
    (sm_90, wait_for_dot): each step's dot finishes before the next loads are issued."""
    BM: tl.constexpr = x_rows.shape[0]
    BB: tl.constexpr = op_rows.shape[0]
    acc = tl.zeros([BM, BB], tl.float32)
    s1 = tl.zeros([BM, BLOCK_K], tl.float32)       # per-element sums, reduced once after the loop
    s2 = tl.zeros([BM, BLOCK_K], tl.float32)
    aa = tl.zeros([BM, BLOCK_K], tl.float32)
    ag = tl.zeros([BM, BLOCK_K], tl.float32)
    ab = tl.zeros([BM, BLOCK_K], tl.float32)
    lane = tl.arange(0, BLOCK_K)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        kk = k0 + lane
        k_ok = kk < K
        x = load_k(x_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K)
        acc = dot_nt(x, load_k(op_rows[:, None] + kk[None, :], k_ok[None, :], EVEN_K), acc, DOT_UPCAST)
        if WAIT_DOT:
            acc += 0.0                             # a use of acc: triton waits for the dot here
        xs = x.to(tl.float32) - pivot[:, None]
        if not EVEN_K:
            xs = tl.where(k_ok[None, :], xs, 0.0)
        s1 += xs
        s2 += xs * xs
        if DISTANCE:
            g, b = load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA, HAS_BETA, EVEN_K)
            a = xs * g[None, :]
            aa += a * a
            ag += a * g[None, :]
            ab += a * b[None, :]
    s1 = tl.sum(s1, axis=1)
    s2 = tl.sum(s2, axis=1)
    aa = tl.sum(aa, axis=1)
    ag = tl.sum(ag, axis=1)
    ab = tl.sum(ab, axis=1)
    acc = tl.sum(tl.reshape(acc, [BM, BB // 2, 2]), axis=2)       # hi + lo of each expert
    if DISTANCE:
        acc -= ab[:, None]
    return acc, s1, s2, aa, ag


@triton.jit
def router_partial_sums(x_rows, pivot, w_ptr, g_ptr, b_ptr, col, k_start, k_stop, K, stride_w, E,
                        BLOCK_E: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                        LAPLACE: tl.constexpr, RAW_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                        USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr, WAIT_DOT: tl.constexpr,
                        PRECISION: tl.constexpr, STAGES: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc [BM, BLOCK_E], s1, s2, aa, ag) of columns k_start:k_stop, by either path (module doc).
    Masks stop at k_stop (slices need not be whole BLOCK_K steps; EVEN_K: they and K are)."""
    if RAW_DOT:                                    # w_ptr is the W' halves [2 * BLOCK_E, K]
        acc, s1, s2, aa, ag = raw_dot_sums(
            x_rows, pivot, row_starts(w_ptr, tl.arange(0, 2 * BLOCK_E), 2 * BLOCK_E, K), g_ptr, b_ptr, k_start,
            k_stop, k_stop, HAS_GAMMA, HAS_BETA, LAPLACE, EVEN_K, DOT_UPCAST, WAIT_DOT, STAGES, BLOCK_K)
    else:
        acc, s1, s2, _, _, aa, ag = ln_dot_sums(
            x_rows, pivot, row_starts(w_ptr, col, E, stride_w), g_ptr, b_ptr, k_start, k_stop, k_stop, HAS_GAMMA,
            HAS_BETA, False, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST, PRECISION, STAGES, BLOCK_K)
    return acc, s1, s2, aa, ag


@triton.jit
def router_logits_finish(acc, s1, s2, aa, ag, pivot, col, sums_ptr, wb_ptr, E, K, eps, HAS_BIAS: tl.constexpr,
                         LAPLACE: tl.constexpr, RAW_DOT: tl.constexpr):
    """fp32 gate logits [BM, BE] from a row block's sums over all of K: LN(x) . w_e, or -||LN(x) - w_e||,
    plus the gate bias. Rows and experts past M and E hold garbage (never stored)."""
    col_ok = col < E
    wg = tl.load(sums_ptr + col, mask=col_ok, other=0.0)
    if RAW_DOT:                                    # x @ W'^T -> a @ W^T
        acc -= pivot[:, None] * wg[None, :]
    d, rstd = ln_stats(s1, s2, K, eps)
    rstd = tl.where(s2 == 0.0, 0.0, rstd)          # a constant row: h = beta exactly (NaN stays NaN)
    if LAPLACE:
        vg = tl.load(sums_ptr + 2 * E + col, mask=col_ok, other=0.0)
        vv = tl.load(sums_ptr + 3 * E + col, mask=col_ok, other=0.0)
        hh = rstd * rstd * (aa - 2.0 * d * ag + d * d * tl.load(sums_ptr + 4 * E))
        sq = hh[:, None] - 2.0 * rstd[:, None] * (acc - d[:, None] * vg[None, :]) + vv[None, :]
        logits = -tl.sqrt_rn(tl.where(sq < 0.0, 0.0, sq))     # rounding below 0 clamps; NaN stays NaN
    else:
        logits = ln_project(acc, d, rstd, wg, tl.load(sums_ptr + E + col, mask=col_ok, other=0.0))
    if HAS_BIAS:
        logits += tl.load(wb_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return logits


@triton.jit
def fused_router_kernel(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, part_ptr, stat_ptr, count_ptr, weights_ptr,
                        indices_ptr, M, E, K, k, k_chunk, stride_x, stride_w, eps, scale, alpha_scaled, inv_norm,
                        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                        LAPLACE: tl.constexpr, RENORMALIZE: tl.constexpr, RAW_DOT: tl.constexpr,
                        SPLITS: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                        DOT_UPCAST: tl.constexpr, WAIT_DOT: tl.constexpr, PRECISION: tl.constexpr,
                        STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_TOPK: tl.constexpr):
    """Program (i, s): rows block i, all experts, K slice s (k_chunk columns); `scale` = log2(e) / T.

    SPLITS > 1: each slice stores its sums to part [S, M, BLOCK_E] and stat [S, ROW_SUMS, M]; the
    last slice of the row block to arrive (count[i] reaches SPLITS - 1) adds them up, resets
    count[i] to 0 and finishes. Its loads bypass L1 (.cg): the parts were written by other SMs."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_E)
    row_ok = row < M
    col_ok = col < E
    x_rows = row_starts(x_ptr, row, M, stride_x)
    pivot = row_pivot(x_rows, K, BLOCK_K)
    k_start = tl.program_id(1) * k_chunk
    acc, s1, s2, aa, ag = router_partial_sums(
        x_rows, pivot, w_ptr, g_ptr, b_ptr, col, k_start, tl.minimum(k_start + k_chunk, K), K, stride_w, E, BLOCK_E,
        HAS_GAMMA, HAS_BETA, LAPLACE, RAW_DOT, EVEN_K, USE_DOT, DOT_UPCAST, WAIT_DOT, PRECISION, STAGES, BLOCK_K)
    last = True
    if SPLITS > 1:
        split = tl.program_id(1).to(tl.int64)
        store_tile(part_ptr + split * M * BLOCK_E, BLOCK_E, row, col, M, BLOCK_E, acc)
        stats = stat_ptr + split * ROW_SUMS * M + row
        tl.store(stats, s1, mask=row_ok)
        tl.store(stats + M, s2, mask=row_ok)
        tl.store(stats + 2 * M, aa, mask=row_ok)
        tl.store(stats + 3 * M, ag, mask=row_ok)
        tl.debug_barrier()                         # every thread's parts are written before the count
        last = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu") == SPLITS - 1
        if last:
            tile_ok = row_ok[:, None] & (col < BLOCK_E)[None, :]
            parts = part_ptr + row.to(tl.int64)[:, None] * BLOCK_E + col[None, :]
            stats = stat_ptr + row
            acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
            s1 = tl.zeros([BLOCK_M], tl.float32)
            s2 = tl.zeros([BLOCK_M], tl.float32)
            aa = tl.zeros([BLOCK_M], tl.float32)
            ag = tl.zeros([BLOCK_M], tl.float32)
            for _ in range(SPLITS):                # slice order: the same bits on every run
                acc += tl.load(parts, mask=tile_ok, other=0.0, cache_modifier=".cg")
                s1 += tl.load(stats, mask=row_ok, other=0.0, cache_modifier=".cg")
                s2 += tl.load(stats + M, mask=row_ok, other=0.0, cache_modifier=".cg")
                aa += tl.load(stats + 2 * M, mask=row_ok, other=0.0, cache_modifier=".cg")
                ag += tl.load(stats + 3 * M, mask=row_ok, other=0.0, cache_modifier=".cg")
                parts += M * BLOCK_E                 # int32: K is split only for small M
                stats += ROW_SUMS * M
            tl.store(count_ptr + tl.program_id(0), 0)
    if last:
        logits = router_logits_finish(acc, s1, s2, aa, ag, pivot, col, sums_ptr, wb_ptr, E, K, eps, HAS_BIAS,
                                      LAPLACE, RAW_DOT)
        z = tl.where(col_ok[None, :], logits * scale, float("-inf"))
        e = tl.exp2(z - tl.max(z, axis=1)[:, None])               # padding lanes: exp2(-inf) = 0
        p = _laplace(e, 1.0 / tl.sum(e, axis=1)[:, None], alpha_scaled, inv_norm)
        valid = row_ok[:, None] & col_ok[None, :]
        values, indices = topk_tile(p, col[None, :], valid, k, BLOCK_TOPK)
        if RENORMALIZE:
            values = values / tl.sum(values, axis=1)[:, None]
        slot = tl.arange(0, BLOCK_TOPK)[None, :]
        out = row.to(tl.int64)[:, None] * k + slot
        out_ok = row_ok[:, None] & (slot < k)
        tl.store(weights_ptr + out, values, mask=out_ok)
        tl.store(indices_ptr + out, indices, mask=out_ok)


@triton.jit
def router_logits_kernel(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, logits_ptr, M, E, K, stride_x, stride_w, eps,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                         LAPLACE: tl.constexpr, RAW_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                         USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr, WAIT_DOT: tl.constexpr,
                         PRECISION: tl.constexpr, STAGES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """E > MAX_FUSED_E: fp32 logits [M, E] in (rows, experts) blocks, for the unfused softmax and
    top-k (RAW_DOT: one expert block, w_ptr the W' halves)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    x_rows = row_starts(x_ptr, row, M, stride_x)
    pivot = row_pivot(x_rows, K, BLOCK_K)
    acc, s1, s2, aa, ag = router_partial_sums(
        x_rows, pivot, w_ptr, g_ptr, b_ptr, col, 0, K, K, stride_w, E, BLOCK_E, HAS_GAMMA, HAS_BETA, LAPLACE,
        RAW_DOT, EVEN_K, USE_DOT, DOT_UPCAST, WAIT_DOT, PRECISION, STAGES, BLOCK_K)
    logits = router_logits_finish(acc, s1, s2, aa, ag, pivot, col, sums_ptr, wb_ptr, E, K, eps, HAS_BIAS, LAPLACE,
                                  RAW_DOT)
    store_tile(logits_ptr, E, row, col, M, E, logits)


# gate weight -> (stamp of (gate weight, ln_weight, ln_bias), sums, W' halves or None); entries die
# with the weight
_GATE_SUMS = WeakTensorKeyDictionary()


def raw_dot_block_e(E: int) -> int:
    """Experts per raw-dot tile: its 2 * BLOCK_E operand rows fill one tl.dot (16+ columns)."""
    return max(8, pow2(E))


def gate_sums(gate_weight, ln_weight, ln_bias) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([N_GATE_SUMS, E] fp32, the raw dot's W' halves [2 * raw_dot_block_e(E), K] or None) from
    gate_sums_kernel, cached until any of the three tensors changes. The operand exists for 16-bit
    gates of up to NARROW_E experts (the raw dot's)."""
    key = (gate_weight, ln_weight, ln_bias)
    cached = _GATE_SUMS.get(gate_weight)
    if cached is not None and same_stamp(cached[0], key):
        return cached[1], cached[2]
    w = rows(gate_weight)
    E, K = w.shape
    g, b = contiguous_vector(ln_weight), contiguous_vector(ln_bias)
    sums = torch.empty((N_GATE_SUMS, E), dtype=torch.float32, device=w.device)
    split = has_w_halves(w)
    op = torch.zeros((2 * raw_dot_block_e(E), K), dtype=w.dtype, device=w.device) if split else None
    block_e = min(16, pow2(E))
    gate_sums_kernel[(triton.cdiv(E, block_e),)](
        w, g if g is not None else w, b if b is not None else w, sums, op if split else w, E, K, w.stride(0),
        HAS_GAMMA=g is not None, HAS_BETA=b is not None, W_HALVES=split, BLOCK_E=block_e,
        BLOCK_K=min(128, pow2(K, 16)), num_warps=4, enable_fp_fusion=FP_FUSION)
    stamp = version_stamp(key)
    if stamp is not None:
        _GATE_SUMS[gate_weight] = (stamp, sums, op)
    return sums, op


# (device, stream) -> int32 counters of the split-K finish, all zero between launches
_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed counters for one launch. Launches on one stream run in order and leave them zero,
    so each stream keeps its own; a CUDA-graph capture gets fresh ones, zeroed inside the graph,
    since its replays may run beside any stream."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = current_stream(device) if device.type == "cuda" else 0
    with _COUNTERS_LOCK:
        counters = _COUNTERS.get((device, stream))
        if counters is None or counters.numel() < n:
            counters = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
            _COUNTERS[(device, stream)] = counters
    return counters


def wait_for_dot(family: str) -> bool:
    """Whether the raw dot waits for each step's dot (WAIT_DOT). Triton (3.6, 3.9) gives x, which the
    dot and the row sums both read, STAGES - 1 shared-memory slots, so the load a step issues (for
    step + STAGES - 1) rewrites that step's slot: sm_90's asynchronous wgmma, still reading it, summed
    some of the next tile (weights off by up to 3e-2, different on each run;
    perf/results/NVIDIA_H200/router_slot_race.txt; offline.shared_slot_races finds the pattern).
    Not elsewhere: sm_100's pipeline gives x as many slots as W and waits for step i - 1's MMA before
    its slot is reloaded (TTGIR, triton 3.6 and 3.9), and there the wait would move the accumulator out
    of tensor memory every step (the distance gate spills, triton 3.9); sm_120's mma is synchronous."""
    return family == "sm_90"


SHARED_HEADROOM = 16384   # shared memory a raw-dot config leaves beside its pipeline (reductions, layout changes)


@dataclass(frozen=True)
class RouterTiling:
    """The tunable part of a narrow-gate (E <= NARROW_E) launch: make_config's arguments."""
    raw_dot: bool
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int


def tiling_from_json(entry: dict) -> RouterTiling:
    return RouterTiling(**entry)


def router_bucket(M: int) -> str:
    """The JSON key of a row count (powers of two: a new batch size does not retune)."""
    return tuning.pow2_bucket(M=M)


def raw_dot_stage_bytes(E: int, block_m: int, block_k: int) -> int:
    """Shared memory of one pipelined K step of the raw dot (16-bit x and W' halves tiles); a
    pipeline of S stages holds S - 1 of them (offline compile)."""
    return (block_m + 2 * raw_dot_block_e(E)) * block_k * 2


@functools.lru_cache(maxsize=1024)
def make_config(E: int, K: int, tiling: RouterTiling) -> dict:
    """A narrow-gate launch config: the raw dot, the pivot path's tl.dot tiles (16+ rows) or its
    broadcast product (fewer), with K cut into `splits` slices of whole 16-column runs. Cached:
    callers must not modify the dict."""
    splits = tiling.splits
    k_chunk = triton.cdiv(triton.cdiv(K, splits), 16) * 16 if splits > 1 else K
    block_k = max(16, min(tiling.block_k, pow2(k_chunk)))
    use_dot = tiling.raw_dot or tiling.block_m >= 16
    block_e = raw_dot_block_e(E) if tiling.raw_dot else max(16, pow2(E)) if use_dot else pow2(E)
    return dict(BLOCK_M=tiling.block_m, BLOCK_E=block_e, BLOCK_K=block_k,
                EVEN_K=k_chunk % block_k == 0 and K % block_k == 0, USE_DOT=use_dot, RAW_DOT=tiling.raw_dot,
                STAGES=tiling.num_stages, SPLITS=triton.cdiv(K, k_chunk), k_chunk=k_chunk,
                num_warps=tiling.num_warps)


@functools.lru_cache(maxsize=1024)
def fallback_tiling(M: int, E: int, K: int, n_sm: int, itemsize: int, raw_dot: bool, family: str) -> RouterTiling:
    """The built-in tiling of a narrow gate (E <= NARROW_E) when no tuned JSON entry applies.
    raw_dot: 16-bit x and gate (the W' halves exist); family: tuning's GPU family (raw-dot
    stages are cut to fit its shared memory).

    Narrow gates (E <= NARROW_E, FuseMoE's E=8), measured on an H200 at K=8320 bf16, CUDA-graph
    times (perf/results/NVIDIA_H200/router_sweeps.txt, sweep 2): from one row per SM, the raw dot in
    64-row blocks, 8 warps (M=8192: 38.5 us = 81% of the x-read floor; the distance gate 52 us, and
    212 us in 32-row blocks). Where those blocks leave SMs idle, K slices give about one program per
    SM (perf/results/NVIDIA_H200/router_slot_race.txt: M=256, 16 slices 9.8 us against 13.6 for
    32-row blocks in 16 slices; M=2048, 4 slices 16.5 us against 34.9 unsliced, 22.9 for 2, 21.8
    for 16).
    Fewer rows: 1-2 rows per program, a broadcast product and K split into ~2 programs per SM
    (sweep 1, M=32: 8 slices, 7.2 us against 9.9 unsplit; 2048-wide steps beat 512 and 1024).
    sm_100 and sm_120 (offline compile only, no timing): the same blocks at 5 stages (81920 bytes of
    shared memory on sm_120), the one depth that compiled without spills for every slice count tried
    under triton 3.6 and 3.9 (ptxas spills a few bytes at 3-4 stages in some builds); run the tuner
    on those cards.
    float32 keeps the pivot path's tl.dot tiles. Wider gates: rows_config's blocks."""
    if raw_dot and M >= RAW_DOT_ROWS_PER_SM * n_sm:
        block_m, block_k, splits = 64, 128, 1
        splits = max(1, min(n_sm // triton.cdiv(M, block_m), K // 512))     # fewer row blocks than SMs
        if family == "sm_90":
            stages = 6
        elif family in ("sm_100", "sm_120"):
            stages = 5                             # 3-4 stages spill a few bytes on some builds there
        else:
            room = tuning.SHARED_LIMIT[family] - SHARED_HEADROOM
            stages = max(2, min(6, room // raw_dot_stage_bytes(E, block_m, block_k) + 1))
        return RouterTiling(True, block_m, block_k, 8, stages, splits)
    if not raw_dot and M >= 8 * n_sm:            # float32: the pivot path's tl.dot tiles
        return RouterTiling(False, min(32, max(16, prev_pow2(M // n_sm))), 128 // itemsize, 4, 3, 1)
    block_m = min(2, prev_pow2(M // n_sm))
    splits = max(1, min(2 * n_sm // triton.cdiv(M, block_m), K // 512))
    return RouterTiling(False, block_m, min(2048, 16384 // (block_m * pow2(E))), 4, 2, splits)


@functools.lru_cache(maxsize=1024)
def _kernel_config(M: int, E: int, K: int, n_sm: int, itemsize: int, raw_dot: bool, family: str) -> dict:
    """Launch config from the built-in table: fallback_tiling for narrow gates, rows_config's
    blocks for wider ones. Cached, callers must not modify the dict."""
    if E > NARROW_E:
        cfg = {("BLOCK_E" if name == "BLOCK_N" else name): value
               for name, value in rows_config(M, E, K, n_sm, itemsize).items()}
        return dict(cfg, RAW_DOT=False, SPLITS=1, k_chunk=K)
    return make_config(E, K, fallback_tiling(M, E, K, n_sm, itemsize, raw_dot, family))


def pick_config(M: int, E: int, K: int, x: torch.Tensor, raw_dot: bool) -> dict:
    """The launch config: a shipped tuned tiling for this bucket where one applies (narrow 16-bit
    gates, the shapes it was tuned on), else the built-in table."""
    if raw_dot:
        tiling = tuning.tuned_config("fused_router", router_bucket(M), tiling_from_json)
        if tiling is not None:
            return make_config(E, K, tiling)
    return _kernel_config(M, E, K, sm_count(x.device), x.element_size(), raw_dot, tuning.device_family(x.device))


def has_w_halves(gate_weight) -> bool:
    """gate_sums builds the W' halves for 16-bit gates of at most NARROW_E experts."""
    return gate_weight.dtype != torch.float32 and gate_weight.shape[0] <= NARROW_E


def raw_dot_ok(x, gate_weight) -> bool:
    """The raw dot needs the W' halves and x of the gate's dtype."""
    return has_w_halves(gate_weight) and gate_weight.dtype == x.dtype


def _logit_args(x, ln_weight, ln_bias, gate_weight, gate_bias, gating, raw_dot):
    """The pointer and flag arguments the two router kernels share (x and gate_weight as [rows, K]);
    raw_dot puts the W' halves in gate_weight's place (the launch flag RAW_DOT comes from the config)."""
    g, b, wb = contiguous_vector(ln_weight), contiguous_vector(ln_bias), contiguous_vector(gate_bias)
    sums, op = gate_sums(gate_weight, ln_weight, ln_bias)
    w = op if raw_dot else rows(gate_weight)
    pointers = (x, g if g is not None else x, b if b is not None else x, w, wb if wb is not None else x, sums)
    flags = dict(HAS_GAMMA=g is not None, HAS_BETA=b is not None, HAS_BIAS=wb is not None,
                 LAPLACE=gating == "laplace", DOT_UPCAST=dot_upcast(x),
                 WAIT_DOT=wait_for_dot(tuning.device_family(x.device)), PRECISION=dot_precision(x.dtype))
    return pointers, flags, w.stride(0)


def launch_router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating) -> torch.Tensor:
    """fp32 gate logits [..., E] (the path for E > MAX_FUSED_E; any E works)."""
    x2 = rows(x)
    M, K = x2.shape
    E = gate_weight.shape[0]
    logits = torch.empty((M, E), dtype=torch.float32, device=x.device)
    if M > 0:
        n_sm, raw_dot = sm_count(x.device), raw_dot_ok(x2, gate_weight)
        pointers, flags, stride_w = _logit_args(x2, ln_weight, ln_bias, gate_weight, gate_bias, gating, raw_dot)
        cfg = dict(_kernel_config(max(M, 8 * n_sm), E, K, n_sm, x.element_size(), raw_dot,
                                  tuning.device_family(x.device)))                         # no K slices
        cfg.pop("SPLITS"), cfg.pop("k_chunk")
        router_logits_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(E, cfg["BLOCK_E"]))](
            *pointers, logits, M, E, K, x2.stride(0), stride_w, eps, **flags, **cfg, enable_fp_fusion=FP_FUSION)
    return logits.reshape(*x.shape[:-1], E)


def launch_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, renormalize,
                        gating, config=None):
    """config: a launch config as make_config returns it (a tuner's or a benchmark's), else pick_config's."""
    E = gate_weight.shape[0]
    if E > MAX_FUSED_E:
        logits = launch_router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating)
        return _topk_gating_op(_softmax_laplace_op(logits, temperature, alpha), k, renormalize)
    x2 = rows(x)
    M = x2.shape[0]
    weights = torch.empty((M, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((M, k), dtype=torch.int32, device=x.device)
    if M > 0:
        params = (ln_weight, ln_bias, gate_weight, gate_bias)
        call = (k, temperature, alpha, eps, renormalize, gating)
        if config is None and plans_apply(x.device):
            key = (x.device.index, current_stream(x.device), tuning.generation(), *x2.shape, x2.stride(0), x2.dtype,
                   x2.data_ptr() % 16, *map(id, params), *call)
            plan = _PLANS.find(key, params)
            if plan is not None:
                plan.launch(x2, weights, indices)
            else:
                _PLANS.record(key, params, *_launch_fused(x2, params, call, weights, indices, None),
                              slots=("x_ptr", "weights_ptr", "indices_ptr"))
        else:
            _launch_fused(x2, params, call, weights, indices, config)
    if x.dim() == 2:
        return weights, indices
    out_shape = (*x.shape[:-1], k)
    return weights.reshape(out_shape), indices.reshape(out_shape)


def _launch_fused(x2, params, call, weights, indices, config):
    """One fused_router_kernel launch through Triton: (compiled kernel, grid, args, kwargs)."""
    ln_weight, ln_bias, gate_weight, gate_bias = params
    k, temperature, alpha, eps, renormalize, gating = call
    (M, K), E = x2.shape, gate_weight.shape[0]
    cfg = config or pick_config(M, E, K, x2, raw_dot_ok(x2, gate_weight))
    pointers, flags, stride_w = _logit_args(x2, ln_weight, ln_bias, gate_weight, gate_bias, gating, cfg["RAW_DOT"])
    blocks, splits = triton.cdiv(M, cfg["BLOCK_M"]), cfg["SPLITS"]
    f32 = dict(dtype=torch.float32, device=x2.device)
    part = torch.empty((splits, M, cfg["BLOCK_E"]), **f32) if splits > 1 else weights
    stat = torch.empty((splits, ROW_SUMS.value, M), **f32) if splits > 1 else weights
    count = split_counters(x2.device, blocks) if splits > 1 else indices
    inv_norm = 1.0 / (1.0 + alpha * E)
    args = (*pointers, part, stat, count, weights, indices, M, E, K, k)
    kwargs = dict(stride_x=x2.stride(0), stride_w=stride_w, eps=eps, scale=LOG2E / temperature,
                  alpha_scaled=alpha * inv_norm, inv_norm=inv_norm, **flags, RENORMALIZE=renormalize,
                  BLOCK_TOPK=pow2(k), **cfg)
    grid = (blocks, splits)
    return fused_router_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION), grid, args, kwargs


# eager launches of fused_router_kernel at a repeated call: launch_plans.py
_PLANS = LaunchPlans(fused_router_kernel)


def offline_builds():
    from .offline import KernelBuild
    K = 8320
    builds = []
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        types = {**{n: f"*{dt}" for n in ("x_ptr", "g_ptr", "b_ptr", "w_ptr", "wb_ptr", "op_ptr")},
                 "weights_ptr": "*fp32", "indices_ptr": "*i32", "logits_ptr": "*fp32", "sums_ptr": "*fp32",
                 "part_ptr": "*fp32", "stat_ptr": "*fp32", "count_ptr": "*i32",
                 **{n: "i32" for n in ("M", "E", "K", "k", "k_chunk", "stride_x", "stride_w")},
                 **{n: "fp32" for n in ("eps", "scale", "alpha_scaled", "inv_norm")}}
        flags = dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True, DOT_UPCAST=False, PRECISION="ieee")

        def fused(name, cfg, E, k, family):
            cfg = dict(cfg)
            warps = cfg.pop("num_warps")
            divisible = divisible_args(M=8192, E=E, K=K, k=k, k_chunk=cfg.pop("k_chunk"), stride_x=K, stride_w=K)
            for laplace in (False, True):
                builds.append(KernelBuild(f"{name}{'_laplace' if laplace else ''}", fused_router_kernel, types,
                                          {**flags, **cfg, "LAPLACE": laplace, "RENORMALIZE": True,
                                           "WAIT_DOT": wait_for_dot(family), "BLOCK_TOPK": pow2(k)},
                                          num_warps=warps, targets=(tuning.FAMILY_CC[family],), divisible=divisible))

        raw_dot = dt != "fp32"
        for family, cc in tuning.FAMILY_CC.items():
            for M, E, k in ((32, 8, 4), (2048, 8, 4), (8192, 8, 4), (32, 512, 8), (8192, 512, 8)):
                cfg = _kernel_config(M, E, K, 132, dtype.itemsize, raw_dot and E <= NARROW_E, family)
                fused(f"router_{dt}_M{M}_E{E}_sm{cc}", cfg, E, k, family)
        if raw_dot:                                # tuned tilings apply to 16-bit narrow gates only
            for targets, label, entry in tuning.shipped_entries("fused_router"):
                for family in (f for f, cc in tuning.FAMILY_CC.items() if cc in targets):
                    name = f"router_{dt}_{label}" + (f"_{family}" if len(targets) > 1 else "")
                    fused(name, make_config(8, K, tiling_from_json(entry)), 8, 4, family)
        cfg = dict(_kernel_config(8192, 1024, K, 132, dtype.itemsize, False, "sm_90"))
        warps = cfg.pop("num_warps")
        cfg.pop("SPLITS"), cfg.pop("k_chunk")
        builds.append(KernelBuild(f"router_logits_{dt}_E1024", router_logits_kernel, types,
                                  {**flags, **cfg, "LAPLACE": True, "WAIT_DOT": False}, num_warps=warps,
                                  divisible=divisible_args(M=8192, E=1024, K=K, stride_x=K, stride_w=K)))
        builds.append(KernelBuild(f"router_gate_sums_{dt}", gate_sums_kernel, types,
                                  dict(HAS_GAMMA=True, HAS_BETA=True, W_HALVES=raw_dot, BLOCK_E=8, BLOCK_K=128),
                                  divisible=divisible_args(E=8, K=K, stride_w=K)))
    return builds


def _fused_router(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], k: int, temperature: float,
                     alpha: float, eps: float, renormalize: bool, gating: str) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 (oracle precision) keeps the reference: the kernels compute in fp32
    if use_triton(x) and x.dtype != torch.float64:
        return launch_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps,
                                   renormalize, gating)
    weights, indices = reference._fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature,
                                               alpha, eps, renormalize, gating)
    return weights.to(torch.float32), indices


_fused_router_op = torch.library.custom_op("fused_ops::fused_router", mutates_args=())(_fused_router)


@_fused_router_op.register_fake
def _(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, renormalize, gating):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def fused_router(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                 gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor] = None, *, k: int,
                 temperature: float = 1.0, alpha: float = 0.0, eps: float = 1e-5, renormalize: bool = False,
                 gating: str = "softmax"):
    """topk_gating(softmax_laplace(gate(LN(x)), temperature, alpha), k) in one launch for E <= 512:
    (weights float32 [..., k], indices int32 [..., k]). gating "softmax" uses LN(x) . w_e as the
    logit, "laplace" -||LN(x) - w_e|| (FuseMoE's distance gate); gate_bias is added to either."""
    reference.check_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, gating)
    op = _fused_router if skips_dispatcher(x, ln_weight, ln_bias, gate_weight, gate_bias) else _fused_router_op
    return op(x, ln_weight, ln_bias, gate_weight, gate_bias, k, float(temperature), float(alpha),
              float(eps), bool(renormalize), gating)
