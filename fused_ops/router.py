"""fused_router: LayerNorm -> gate -> temperature softmax -> Laplace smoothing -> top-k, one launch.

Each program takes BLOCK_M rows and all E experts (E <= MAX_FUSED_E): it streams its rows of x
once (with the small gate weight, which stays in L2), builds the gate logits with the LayerNorm
folded in (layernorm_linear.py's helpers and algebra), then softmax, smoothing and top-k run on
the [BLOCK_M, E] logit tile in registers. Nothing but the k weights and indices is written.

gating="laplace" (FuseMoE's distance gate): logit_e = -||h - w_e|| with h = LN(x). From the same
pass, with v_e = w_e - beta and h = rstd * (a - d * gamma) + beta (a = (x - pivot) * gamma,
d = mean - pivot):
    ||h - w_e||^2 = rstd^2 ||a - d gamma||^2 - 2 rstd (a - d gamma) . v_e + ||v_e||^2
    ||a - d gamma||^2 = a.a - 2 d a.gamma + d^2 gamma.gamma
The row terms are sums of the K loop; the shift keeps d small, so nothing cancels but h ~ w_e
itself (clamped at 0 before the square root).
The terms that depend on the parameters alone (W @ gamma, W @ beta, v_e . gamma, ||v_e||^2,
gamma . gamma) come from gate_sums_kernel, run once per version of (gate weight, LN weight, LN bias)
and cached: the K loop keeps only work on x (a first call, or inference tensors, which keep no
version, add that small launch).
Wider E computes the logits with the same kernel tiled over experts, then the unfused ops.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from . import reference
from ._runtime import dot_precision, dot_upcast, pow2, rows, sm_count, use_triton
from .layernorm_linear import (TILE_BUDGET, contiguous_vector, divisible_args, lane_sums, ln_dot_sums,
                               ln_project, ln_stats, load_affine, prev_pow2, row_pivot, row_starts, rows_config,
                               same_stamp, store_tile, version_stamp)
from .softmax import LOG2E, _laplace, _softmax_laplace_op
from .topk import _topk_gating_op, topk_tile

MAX_FUSED_E = 512      # widest expert row one program holds for softmax and top-k
N_GATE_SUMS = 5        # rows of gate_sums_kernel's output


@triton.jit
def gate_sums_kernel(w_ptr, g_ptr, b_ptr, sums_ptr, E, K, stride_w, HAS_GAMMA: tl.constexpr,
                     HAS_BETA: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """sums [N_GATE_SUMS, E] fp32: W @ gamma, W @ beta, v_e . gamma, ||v_e||^2 (v_e = w_e - beta) and
    gamma . gamma (in every column), for experts col."""
    col = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    w_rows = row_starts(w_ptr, col, E, stride_w)
    wg = tl.zeros([BLOCK_E, BLOCK_K // 8], tl.float32)
    wb = tl.zeros([BLOCK_E, BLOCK_K // 8], tl.float32)
    vg = tl.zeros([BLOCK_E, BLOCK_K // 8], tl.float32)
    vv = tl.zeros([BLOCK_E, BLOCK_K // 8], tl.float32)
    gg = tl.zeros([BLOCK_K], tl.float32)
    lane = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + lane
        k_ok = kk < K
        w = tl.load(w_rows[:, None] + kk[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
        g, b = load_affine(g_ptr, b_ptr, kk, k_ok, HAS_GAMMA, HAS_BETA, False)
        v = w - b[None, :]
        wg += lane_sums(w * g[None, :])
        wb += lane_sums(w * b[None, :])
        vg += lane_sums(v * g[None, :])
        vv += lane_sums(v * v)
        gg += g * g
    ok = col < E
    tl.store(sums_ptr + col, tl.sum(wg, axis=1), mask=ok)
    tl.store(sums_ptr + E + col, tl.sum(wb, axis=1), mask=ok)
    tl.store(sums_ptr + 2 * E + col, tl.sum(vg, axis=1), mask=ok)
    tl.store(sums_ptr + 3 * E + col, tl.sum(vv, axis=1), mask=ok)
    tl.store(sums_ptr + 4 * E + col, tl.zeros([BLOCK_E], tl.float32) + tl.sum(gg, axis=0), mask=ok)


@triton.jit
def router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, row, col, M, E, K, stride_x, stride_w, eps,
                       HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                       LAPLACE: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                       DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """fp32 gate logits [BM, BE] of rows `row` for experts `col`: LN(x) . w_e, or -||LN(x) - w_e||, plus
    the gate bias; one pass over x, the parameter terms from `sums` (gate_sums_kernel). Rows and
    experts past M and E hold garbage (never stored)."""
    x_rows = row_starts(x_ptr, row, M, stride_x)
    acc, s1, s2, _, _, aa, ag = ln_dot_sums(
        x_rows, row_pivot(x_rows, K, BLOCK_K), row_starts(w_ptr, col, E, stride_w), g_ptr, b_ptr, 0, K, K,
        HAS_GAMMA, HAS_BETA, False, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST, PRECISION, STAGES, BLOCK_K)
    d, rstd = ln_stats(s1, s2, K, eps)
    col_ok = col < E
    if LAPLACE:
        vg = tl.load(sums_ptr + 2 * E + col, mask=col_ok, other=0.0)
        vv = tl.load(sums_ptr + 3 * E + col, mask=col_ok, other=0.0)
        hh = rstd * rstd * (aa - 2.0 * d * ag + d * d * tl.load(sums_ptr + 4 * E))
        sq = hh[:, None] - 2.0 * rstd[:, None] * (acc - d[:, None] * vg[None, :]) + vv[None, :]
        logits = -tl.sqrt_rn(tl.where(sq < 0.0, 0.0, sq))     # rounding below 0 clamps; NaN stays NaN
    else:
        wg = tl.load(sums_ptr + col, mask=col_ok, other=0.0)
        logits = ln_project(acc, d, rstd, wg, tl.load(sums_ptr + E + col, mask=col_ok, other=0.0))
    if HAS_BIAS:
        logits += tl.load(wb_ptr + col, mask=col < E, other=0.0).to(tl.float32)[None, :]
    return logits


@triton.jit
def fused_router_kernel(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, weights_ptr, indices_ptr, M, E, K, k, stride_x,
                        stride_w, eps, scale, alpha_scaled, inv_norm, HAS_GAMMA: tl.constexpr,
                        HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr, LAPLACE: tl.constexpr,
                        RENORMALIZE: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                        DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_TOPK: tl.constexpr):
    """BLOCK_M rows, all experts; `scale` = log2(e) / temperature."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_E)
    row_ok = row < M
    col_ok = col < E
    logits = router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, row, col, M, E, K, stride_x,
                                stride_w, eps, HAS_GAMMA, HAS_BETA, HAS_BIAS, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST,
                                PRECISION, STAGES, BLOCK_K)
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
                         LAPLACE: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """E > MAX_FUSED_E: fp32 logits [M, E] in (rows, experts) blocks, for the unfused softmax and top-k."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    logits = router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, sums_ptr, row, col, M, E, K, stride_x,
                                stride_w, eps, HAS_GAMMA, HAS_BETA, HAS_BIAS, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST,
                                PRECISION, STAGES, BLOCK_K)
    store_tile(logits_ptr, E, row, col, M, E, logits)


# gate weight -> (stamp of (gate weight, ln_weight, ln_bias), gate_sums_kernel's output); entries die
# with the weight
_GATE_SUMS = WeakTensorKeyDictionary()


def gate_sums(gate_weight, ln_weight, ln_bias) -> torch.Tensor:
    """[N_GATE_SUMS, E] fp32 (gate_sums_kernel), cached until any of the three tensors changes."""
    key = (gate_weight, ln_weight, ln_bias)
    cached = _GATE_SUMS.get(gate_weight)
    if cached is not None and same_stamp(cached[0], key):
        return cached[1]
    w = rows(gate_weight)
    E, K = w.shape
    g, b = contiguous_vector(ln_weight), contiguous_vector(ln_bias)
    sums = torch.empty((N_GATE_SUMS, E), dtype=torch.float32, device=w.device)
    block_e = min(16, pow2(E))
    gate_sums_kernel[(triton.cdiv(E, block_e),)](
        w, g if g is not None else w, b if b is not None else w, sums, E, K, w.stride(0), HAS_GAMMA=g is not None,
        HAS_BETA=b is not None, BLOCK_E=block_e, BLOCK_K=min(128, pow2(K, 16)), num_warps=4)
    stamp = version_stamp(key)
    if stamp is not None:
        _GATE_SUMS[gate_weight] = (stamp, sums)
    return sums


def _logit_args(x, ln_weight, ln_bias, gate_weight, gate_bias, gating):
    """The pointer and flag arguments the two router kernels share (x and gate_weight as [rows, K])."""
    g, b, wb = contiguous_vector(ln_weight), contiguous_vector(ln_bias), contiguous_vector(gate_bias)
    w = rows(gate_weight)
    pointers = (x, g if g is not None else x, b if b is not None else x, w, wb if wb is not None else x,
                gate_sums(gate_weight, ln_weight, ln_bias))
    flags = dict(HAS_GAMMA=g is not None, HAS_BETA=b is not None, HAS_BIAS=wb is not None,
                 LAPLACE=gating == "laplace", DOT_UPCAST=dot_upcast(x), PRECISION=dot_precision(x.dtype))
    return pointers, flags


NARROW_E = 8           # up to this many experts the router takes its own blocks (below), else rows_config's


@functools.lru_cache(maxsize=1024)
def _kernel_config(M: int, E: int, K: int, n_sm: int, itemsize: int, laplace: bool) -> dict:
    """Blocks of the router kernels (experts are rows_config's columns); cached, callers must not
    modify the dict.

    Narrow gates (E <= NARROW_E, FuseMoE's E=8) were measured on an H200 at K=8320 (bf16): with 8+
    rows per SM, tl.dot tiles of 16 rows (M=2048: 55 us against 207 for rows_config's 4-row
    broadcast tiles, with 512-byte K steps before the split-operand dot) up to 32 rows, 4 warps,
    128-byte K steps (M=8192: 92 us, distance gate 104; 256-byte steps 101 and 120, 16 rows 104,
    8 warps 108; 512-byte steps ran 77 us but spill under triton 3.9, and so do 16 rows of them;
    3 to 6 stages time the same). Fewer rows keep 1-2 rows per program, 1024-wide K steps and 4
    warps (M=32: 11.4 us graph time, distance gate 16.7)."""
    if E > NARROW_E:
        return {("BLOCK_E" if name == "BLOCK_N" else name): value
                for name, value in rows_config(M, E, K, n_sm, itemsize).items()}
    if M >= 8 * n_sm:
        block_m = min(32, max(16, prev_pow2(M // n_sm)))
        block_e, use_dot, stages = 16, True, 3
        block_k = 128 // itemsize      # wider steps spill (the split operand doubles the dot's tiles)
    else:                              # 3 stages of 1024-wide fp32 steps spill on sm_100
        block_m, block_e, use_dot, stages = min(2, prev_pow2(M // n_sm)), pow2(E), False, 2
        block_k = min(1024, TILE_BUDGET // (block_m * block_e))
    block_k = max(16, min(block_k, pow2(K)))
    return dict(BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=block_k, EVEN_K=K % block_k == 0, USE_DOT=use_dot,
                STAGES=stages, num_warps=4)


def launch_router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating) -> torch.Tensor:
    """fp32 gate logits [..., E] (the path for E > MAX_FUSED_E; any E works)."""
    x2 = rows(x)
    w = rows(gate_weight)
    M, K = x2.shape
    E = w.shape[0]
    logits = torch.empty((M, E), dtype=torch.float32, device=x.device)
    if M > 0:
        pointers, flags = _logit_args(x2, ln_weight, ln_bias, gate_weight, gate_bias, gating)
        cfg = _kernel_config(M, E, K, sm_count(x.device), x.element_size(), gating == "laplace")
        router_logits_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(E, cfg["BLOCK_E"]))](
            *pointers, logits, M, E, K, x2.stride(0), w.stride(0), eps, **flags, **cfg)
    return logits.reshape(*x.shape[:-1], E)


def launch_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, renormalize,
                        gating):
    E = gate_weight.shape[0]
    if E > MAX_FUSED_E:
        logits = launch_router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating)
        return _topk_gating_op(_softmax_laplace_op(logits, temperature, alpha), k, renormalize)
    x2 = rows(x)
    w = rows(gate_weight)
    M, K = x2.shape
    weights = torch.empty((M, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((M, k), dtype=torch.int32, device=x.device)
    if M > 0:
        pointers, flags = _logit_args(x2, ln_weight, ln_bias, gate_weight, gate_bias, gating)
        cfg = _kernel_config(M, E, K, sm_count(x.device), x.element_size(), gating == "laplace")
        inv_norm = 1.0 / (1.0 + alpha * E)
        fused_router_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            *pointers, weights, indices, M, E, K, k, x2.stride(0), w.stride(0), eps, LOG2E / temperature,
            alpha * inv_norm, inv_norm, **flags, RENORMALIZE=renormalize, BLOCK_TOPK=pow2(k), **cfg)
    out_shape = (*x.shape[:-1], k)
    return weights.reshape(out_shape), indices.reshape(out_shape)


def offline_builds():
    from .offline import KernelBuild
    K = 8320
    builds = []
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        types = {**{n: f"*{dt}" for n in ("x_ptr", "g_ptr", "b_ptr", "w_ptr", "wb_ptr")},
                 "weights_ptr": "*fp32", "indices_ptr": "*i32", "logits_ptr": "*fp32", "sums_ptr": "*fp32",
                 **{n: "i32" for n in ("M", "E", "K", "k", "stride_x", "stride_w")},
                 **{n: "fp32" for n in ("eps", "scale", "alpha_scaled", "inv_norm")}}
        flags = dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True, DOT_UPCAST=False, PRECISION="ieee")
        for M, E, k in ((32, 8, 4), (2048, 8, 4), (8192, 8, 4), (32, 512, 8), (8192, 512, 8)):
            divisible = divisible_args(M=M, E=E, K=K, k=k, stride_x=K, stride_w=K)
            for laplace in (False, True):
                cfg = dict(_kernel_config(M, E, K, n_sm=132, itemsize=dtype.itemsize, laplace=laplace))
                warps = cfg.pop("num_warps")
                builds.append(KernelBuild(f"router_{dt}_M{M}_E{E}{'_laplace' if laplace else ''}",
                                          fused_router_kernel, types,
                                          {**flags, **cfg, "LAPLACE": laplace, "RENORMALIZE": True,
                                           "BLOCK_TOPK": pow2(k)}, num_warps=warps, divisible=divisible))
        cfg = dict(_kernel_config(8192, 1024, K, n_sm=132, itemsize=dtype.itemsize, laplace=True))
        warps = cfg.pop("num_warps")
        builds.append(KernelBuild(f"router_logits_{dt}_E1024", router_logits_kernel, types,
                                  {**flags, **cfg, "LAPLACE": True}, num_warps=warps,
                                  divisible=divisible_args(M=8192, E=1024, K=K, stride_x=K, stride_w=K)))
        builds.append(KernelBuild(f"router_gate_sums_{dt}", gate_sums_kernel, types,
                                  dict(HAS_GAMMA=True, HAS_BETA=True, BLOCK_E=16, BLOCK_K=128),
                                  divisible=divisible_args(E=512, K=K, stride_w=K)))
    return builds


@torch.library.custom_op("fused_ops::fused_router", mutates_args=())
def _fused_router_op(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], k: int, temperature: float,
                     alpha: float, eps: float, renormalize: bool, gating: str) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 (oracle precision) keeps the reference: the kernels compute in fp32
    if use_triton(x) and x.dtype != torch.float64:
        return launch_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps,
                                   renormalize, gating)
    weights, indices = reference._fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature,
                                               alpha, eps, renormalize, gating)
    return weights.to(torch.float32), indices


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
    return _fused_router_op(x, ln_weight, ln_bias, gate_weight, gate_bias, k, float(temperature), float(alpha),
                            float(eps), bool(renormalize), gating)
