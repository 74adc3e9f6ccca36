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
All terms are sums of the K loop; the shift keeps d small, so nothing cancels but h ~ w_e itself
(clamped at 0 before the square root).
Wider E computes the logits with the same kernel tiled over experts, then the unfused ops.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import dot_upcast, pow2, rows, sm_count, use_triton
from .layernorm_linear import (TILE_BUDGET, contiguous_vector, divisible_args, dot_precision, ln_dot_sums,
                               ln_project, ln_stats, prev_pow2, row_pivot, row_starts, rows_config, store_tile)
from .softmax import LOG2E, _laplace, _softmax_laplace_op
from .topk import _topk_gating_op, topk_tile

MAX_FUSED_E = 512      # widest expert row one program holds for softmax and top-k


@triton.jit
def router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, row, col, M, E, K, stride_x, stride_w, eps,
                       HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                       LAPLACE: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                       DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """fp32 gate logits [BM, BE] of rows `row` for experts `col`: LN(x) . w_e, or -||LN(x) - w_e||, plus
    the gate bias; one pass over x. Rows and experts past M and E hold garbage (never stored)."""
    x_rows = row_starts(x_ptr, row, M, stride_x)
    acc, s1, s2, c1, c2, aa, ag, vv, gg = ln_dot_sums(
        x_rows, row_pivot(x_rows, K, BLOCK_K), row_starts(w_ptr, col, E, stride_w), g_ptr, b_ptr, 0, K, K,
        HAS_GAMMA, HAS_BETA, True, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST, PRECISION, STAGES, BLOCK_K)
    d, rstd = ln_stats(s1, s2, K, eps)
    if LAPLACE:
        hh = rstd * rstd * (aa - 2.0 * d * ag + d * d * gg)
        sq = hh[:, None] - 2.0 * rstd[:, None] * (acc - d[:, None] * c1[None, :]) + vv[None, :]
        logits = -tl.sqrt_rn(tl.where(sq < 0.0, 0.0, sq))     # rounding below 0 clamps; NaN stays NaN
    else:
        logits = ln_project(acc, d, rstd, c1, c2)
    if HAS_BIAS:
        logits += tl.load(wb_ptr + col, mask=col < E, other=0.0).to(tl.float32)[None, :]
    return logits


@triton.jit
def fused_router_kernel(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, weights_ptr, indices_ptr, M, E, K, k, stride_x,
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
    logits = router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, row, col, M, E, K, stride_x, stride_w, eps,
                                HAS_GAMMA, HAS_BETA, HAS_BIAS, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST, PRECISION,
                                STAGES, BLOCK_K)
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
def router_logits_kernel(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, logits_ptr, M, E, K, stride_x, stride_w, eps,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
                         LAPLACE: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """E > MAX_FUSED_E: fp32 logits [M, E] in (rows, experts) blocks, for the unfused softmax and top-k."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    logits = router_logits_tile(x_ptr, g_ptr, b_ptr, w_ptr, wb_ptr, row, col, M, E, K, stride_x, stride_w, eps,
                                HAS_GAMMA, HAS_BETA, HAS_BIAS, LAPLACE, EVEN_K, USE_DOT, DOT_UPCAST, PRECISION,
                                STAGES, BLOCK_K)
    store_tile(logits_ptr, E, row, col, M, E, logits)


def _logit_args(x, ln_weight, ln_bias, gate_weight, gate_bias, gating):
    """The pointer and flag arguments the two router kernels share."""
    g, b, wb = contiguous_vector(ln_weight), contiguous_vector(ln_bias), contiguous_vector(gate_bias)
    pointers = (x, g if g is not None else x, b if b is not None else x, gate_weight, wb if wb is not None else x)
    flags = dict(HAS_GAMMA=g is not None, HAS_BETA=b is not None, HAS_BIAS=wb is not None,
                 LAPLACE=gating == "laplace", DOT_UPCAST=dot_upcast(x), PRECISION=dot_precision(x))
    return pointers, flags


NARROW_E = 8           # up to this many experts the router takes its own blocks (below), else rows_config's


@functools.lru_cache(maxsize=1024)
def _kernel_config(M: int, E: int, K: int, n_sm: int, itemsize: int, laplace: bool) -> dict:
    """Blocks of the router kernels (experts are rows_config's columns); cached, callers must not
    modify the dict.

    Narrow gates (E <= NARROW_E, FuseMoE's E=8) were measured on an H200 at K=8320 (bf16): with 8+
    rows per SM, tl.dot tiles of 16 rows (M=2048: 55 us against 207 for rows_config's 4-row
    broadcast tiles) up to 32 rows with 4 warps (M=8192: 118 us against 170 for 16 rows, 184 for
    32 rows with 8 warps); the distance gate holds more sums: with 32 rows it takes half-width K
    steps (137 us; full-width ones spill on sm_100/sm_120, and so do 64 rows with 8 warps). Fewer
    rows keep 1-2 rows per program, 1024-wide K steps and 4 warps (M=32: 14 us graph time against
    17 with 8 warps)."""
    if E > NARROW_E:
        return {("BLOCK_E" if name == "BLOCK_N" else name): value
                for name, value in rows_config(M, E, K, n_sm, itemsize).items()}
    if M >= 8 * n_sm:
        block_m = min(32, max(16, prev_pow2(M // n_sm)))
        block_e, use_dot = 16, True
        block_k = (256 if laplace and block_m == 32 else 512) // itemsize
    else:
        block_m, block_e, use_dot = min(2, prev_pow2(M // n_sm)), pow2(E), False
        block_k = min(1024, TILE_BUDGET // (block_m * block_e))
    block_k = max(16, min(block_k, pow2(K)))
    return dict(BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=block_k, EVEN_K=K % block_k == 0, USE_DOT=use_dot,
                STAGES=3, num_warps=4)


def launch_router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating) -> torch.Tensor:
    """fp32 gate logits [..., E] (the path for E > MAX_FUSED_E; any E works)."""
    x2 = rows(x)
    w = rows(gate_weight)
    M, K = x2.shape
    E = w.shape[0]
    logits = torch.empty((M, E), dtype=torch.float32, device=x.device)
    if M > 0:
        pointers, flags = _logit_args(x2, ln_weight, ln_bias, w, gate_bias, gating)
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
        pointers, flags = _logit_args(x2, ln_weight, ln_bias, w, gate_bias, gating)
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
                 "weights_ptr": "*fp32", "indices_ptr": "*i32", "logits_ptr": "*fp32",
                 **{n: "i32" for n in ("M", "E", "K", "k", "stride_x", "stride_w")},
                 **{n: "fp32" for n in ("eps", "scale", "alpha_scaled", "inv_norm")}}
        flags = dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True, DOT_UPCAST=False, PRECISION="ieee")
        for M, E, k in ((32, 8, 4), (8192, 8, 4), (32, 512, 8), (8192, 512, 8)):
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
