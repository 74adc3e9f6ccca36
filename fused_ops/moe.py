"""moe_experts: top-k mixture-of-experts FFN as two grouped GEMMs over expert-sorted (token, slot) pairs.

  y[m] = sum_j weights[m, j] * (act(x[m] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]),  e = indices[m, j]

Pipeline (no host sync anywhere, so the whole op is CUDA-graph capturable):
  1. moe_align (moe_align.py): pairs p = m * k + j grouped by expert, each expert padded to BLOCK_M,
     plus a tile -> expert table; scratch sized on the host for the worst routing.
  2. moe_gemm1_kernel: one program per (BLOCK_M tile of one expert's pairs, BLOCK_N columns of H).
     Token rows are gathered from x through pointers (no permuted copy of x); weight tiles come
     through TMA descriptors on sm_90 / sm_100 for 16-bit contiguous weights (H200, 8192 tokens: the
     first GEMM 3.53 ms against 4.02 through pointers, perf/results/NVIDIA_H200/moe_tma.txt), else
     through pointers; bias and
     activation in the epilogue; h [M*k, H] written once, in x's dtype, at row p.
  3. moe_gemm2_kernel: the same over (tile, N columns) reading h rows p; bias and routing weight in
     the epilogue. k = 1: rows go straight to y. k > 1: rows go to o [M*k, N] = [M, k, N] in x's
     dtype and moe_combine_kernel sums each token's k rows in slot order (deterministic). Opt-in
     (`atomic=True` or FUSED_OPS_MOE_ATOMIC=1): atomic float32 adds into y instead (not bitwise
     reproducible; saves the combine launch and the [M, k, N] buffer).
The grids depend on the shapes only: programs of tiles past the routed ones exit at once, so an
expert without tokens costs a launch's share. With few tokens (M * k / E small) a tile holds every
pair of its expert, so the grid is (expert, column block): each weight block is streamed from HBM
once, across all SMs, and the batch is weight-bandwidth bound. Tiles of fewer than 64 pairs are
computed transposed (swap-AB: weight rows on the MMA's M side), so they still run on wgmma / tcgen05.

Indices outside [0, E) cannot be rejected without a sync: their pairs get a bucket of their own
whose second-GEMM tiles write NaN, so those tokens' rows of y are NaN (never a silent wrong value,
never an out-of-bounds read). Off CUDA (the reference, or the kernels through the interpreter)
the check costs no device sync, so the op raises ValueError there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference, tuning
from ._runtime import (FP_FUSION, TL_DTYPE, TMA_FAMILIES, dot_upcast, gemm_precision, skips_dispatcher, tma_ok,
                       use_triton)
from .moe_align import launch_moe_align

ATOMIC_ENV = "FUSED_OPS_MOE_ATOMIC"


@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu_tanh":      # 0.5 h (1 + tanh(u)) = h sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3)
        out = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACTIVATION == "gelu":         # 0.5 h (1 + erf(h / sqrt(2)))
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "relu":
        out = tl.where(h < 0.0, 0.0, h)          # keeps NaN, like torch
    else:
        out = h * tl.sigmoid(h)
    return out


@triton.jit
def _tile_order(pid, n_tiles, n_cols, GROUP_M: tl.constexpr):
    """pid -> (tile, column block). GROUP_M tiles sweep the column blocks together, so a weight block
    is reused from L2; tiles stay in order, so the idle ones past the routed ones come last."""
    per_group = GROUP_M * n_cols
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _mma(a, b, acc, SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, or with SWAP_AB acc^T + b^T @ a^T: few-token tiles put the weight rows on the
    matrix instruction's M side (64+ rows for wgmma / tcgen05) and the tokens on its N side."""
    if DOT_F32:                                  # the interpreter's bf16 dot is wrong
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if SWAP_AB:
        out = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _load_tiles(a_ptrs, b_ptrs, w_desc, w_row, k0, k_left, offs_k, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] and [BLOCK_K, BLOCK_N] operand tiles, zero past the contraction end.
    TMA: the weight tile comes through the descriptor (rows w_row.., columns k0..; the copy engine
    zero-fills past the tensor; rows of the next expert, where a column block crosses into it, are
    never stored), the gathered token rows through pointers either way."""
    if EVEN_K:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=(offs_k < k_left)[None, :], other=0.0)
    if TMA:
        b = w_desc.load([w_row, k0]).T
    elif EVEN_K:
        b = tl.load(b_ptrs)
    else:
        b = tl.load(b_ptrs, mask=(offs_k < k_left)[:, None], other=0.0)
    return a, b


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    return acc


@triton.jit
def moe_gemm1_kernel(x_ptr, w_ptr, w_desc, b_ptr, h_ptr, pairs_ptr, tile_bucket_ptr,
                     n_pairs, top_k, n_experts, n_tiles, K, H,
                     stride_xm, stride_xk, stride_we, stride_wh, stride_wk, stride_be, stride_bh, stride_hp,
                     HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                     SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h[p, n] = act(x[p // k] @ w1[e, n]^T + b1[e, n]) for the pairs p of one tile of expert e."""
    tile, col = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(tile_bucket_ptr + tile)
    if expert < n_experts:                       # the NaN bucket and unused tiles have nothing to do
        pair = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        live = pair < n_pairs
        token = tl.where(live, pair // top_k, 0)            # padding rows read row 0, never stored
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # columns past H wrap around (valid addresses; those columns are never stored)
        w_rows = (offs_n % H).to(tl.int64)
        a_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :] * stride_wh + offs_k[:, None] * stride_wk
        w_row = expert * H + col * BLOCK_N                 # TMA: w as [E * H, K]
        acc = _zeros(BLOCK_M, BLOCK_N, SWAP_AB)
        for k0 in range(0, K, BLOCK_K):
            a, b = _load_tiles(a_ptrs, b_ptrs, w_desc, w_row, k0, K - k0, offs_k, EVEN_K, TMA)
            acc = _mma(a, b, acc, SWAP_AB, DOT_F32, PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_wk
        if SWAP_AB:
            acc = tl.trans(acc)
        n_ok = offs_n < H
        if HAS_BIAS:
            bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bh, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        h = _activate(acc, ACTIVATION)
        h_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_hp + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=live[:, None] & n_ok[None, :])


@triton.jit
def moe_gemm2_kernel(h_ptr, w_ptr, w_desc, b_ptr, rw_ptr, out_ptr, pairs_ptr, tile_bucket_ptr,
                     n_pairs, top_k, n_experts, n_tiles, H, N,
                     stride_hp, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_rm, stride_rj,
                     stride_om,
                     HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                     SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """weights[p] * (h[p] @ w2[e, n]^T + b2[e, n]) to out row p (ATOMIC: added to y row p // k).
    Tiles of the NaN bucket (indices outside [0, E)) read no weights and write NaN."""
    tile, col = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(tile_bucket_ptr + tile)
    if expert <= n_experts:                      # past the last bucket: unused tile
        routed = expert < n_experts
        pair = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        live = pair < n_pairs
        token = pair // top_k
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = (offs_n % N).to(tl.int64)
        e = tl.minimum(expert, n_experts - 1).to(tl.int64)
        a_ptrs = h_ptr + tl.where(live, pair, 0).to(tl.int64)[:, None] * stride_hp + offs_k[None, :]
        b_ptrs = w_ptr + e * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
        w_row = e.to(tl.int32) * N + col * BLOCK_N            # TMA: w as [E * N, H]
        acc = _zeros(BLOCK_M, BLOCK_N, SWAP_AB)
        for k0 in range(0, tl.where(routed, H, 0), BLOCK_K):
            a, b = _load_tiles(a_ptrs, b_ptrs, w_desc, w_row, k0, H - k0, offs_k, EVEN_K, TMA)
            acc = _mma(a, b, acc, SWAP_AB, DOT_F32, PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
        if SWAP_AB:
            acc = tl.trans(acc)
        if HAS_BIAS:
            bias_ok = offs_n < tl.where(routed, N, 0)          # the NaN bucket reads no bias (E may be 0)
            bias = tl.load(b_ptr + e * stride_be + offs_n * stride_bn, mask=bias_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        slot = pair - token * top_k
        rw = tl.load(rw_ptr + token.to(tl.int64) * stride_rm + slot * stride_rj, mask=live, other=0.0)
        acc = tl.where(routed, acc * rw.to(tl.float32)[:, None], float("nan"))
        out_row = token if ATOMIC else pair
        out_ptrs = out_ptr + out_row.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        out_mask = live[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def moe_combine_kernel(o_ptr, y_ptr, M, N, top_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m] = sum_j o[m * k + j] in slot order, float32 accumulation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    first = rows.to(tl.int64) * top_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for j in range(top_k):
        acc += tl.load(o_ptr + (first + j)[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# configs: a heuristic table by mean pairs per expert (the tuner replaces it later)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    """One GEMM's tiling for 2-byte inputs (float32 takes its family's tile, see _for_dtype)."""
    block_n: int          # output columns per program (H for the first GEMM, N for the second)
    block_k: int          # contraction step
    group_m: int          # tiles that sweep the column blocks together (L2 reuse)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    block_m: int          # pairs per tile: the routing alignment, shared by both GEMMs
    gemm1: GemmConfig
    gemm2: GemmConfig

    @property
    def swap_ab(self) -> bool:
        """Tiles of fewer than 64 pairs run transposed (weight rows on the instruction's M side)."""
        return self.block_m < 64


# (largest mean pairs per expert, config). Few pairs: one tile holds all of an expert's pairs and
# 64-column blocks give ~E x H / 64 programs that stream the weights over every SM once (bandwidth
# bound). Many pairs: 128-row tiles and wgmma-sized blocks (compute bound).
CONFIGS_SM90 = (      # 232448 B of shared memory per block: sm_90, sm_100
    (8, MoeConfig(16, GemmConfig(64, 128, 1, 4, 5), GemmConfig(64, 128, 1, 4, 4))),
    (24, MoeConfig(32, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))),
    (48, MoeConfig(64, GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 4, 3))),
    (256, MoeConfig(64, GemmConfig(128, 64, 4, 4, 4), GemmConfig(64, 64, 4, 4, 4))),
    (None, MoeConfig(128, GemmConfig(256, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 4))),
)
CONFIGS_SMALL_SMEM = (  # 101376 B: sm_120 (and sm_86 / sm_89)
    (8, MoeConfig(16, GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 4, 3))),
    (24, MoeConfig(32, GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 4, 3))),
    (48, MoeConfig(64, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3))),
    (256, MoeConfig(64, GemmConfig(128, 64, 4, 4, 3), GemmConfig(64, 64, 4, 4, 3))),
    (None, MoeConfig(128, GemmConfig(128, 32, 8, 8, 4), GemmConfig(128, 32, 8, 8, 4))),
)
# the interpreter: small blocks so CPU tests cover several tiles, column blocks and K steps
CONFIG_INTERPRETER = MoeConfig(16, GemmConfig(32, 32, 2, 4, 1), GemmConfig(32, 32, 2, 4, 1))


def config_table(family: str):
    return CONFIGS_SM90 if family in ("sm_90", "sm_100") else CONFIGS_SMALL_SMEM


def pairs_bucket(n_pairs: int, n_experts: int) -> int:
    """Mean pairs per expert rounded up to a power of two: the key configs are stored under."""
    per = -(-n_pairs // n_experts)
    b = 1
    while b < per:
        b *= 2
    return b


def fallback_config(bucket: str, family: str) -> MoeConfig:
    per_expert = int(bucket.removeprefix("pairs"))
    for limit, config in config_table(family):
        if limit is None or per_expert <= limit:
            return config


def config_from_json(entry: dict) -> MoeConfig:
    return MoeConfig(entry["block_m"], GemmConfig(**entry["gemm1"]), GemmConfig(**entry["gemm2"]))


def pick_config(n_pairs: int, n_experts: int, device: torch.device) -> MoeConfig:
    if device.type != "cuda":
        return CONFIG_INTERPRETER
    bucket = f"pairs{pairs_bucket(n_pairs, n_experts)}"
    return tuning.config_for("moe_experts", bucket, fallback_config, config_from_json)


# float32's (block_n, block_k) by family (tf32x3 dots, gemm_precision; 8 warps, 3 stages): on the H100
# 128 x 32 took 0.54 and 9.1 ms at 32 and 2048 tokens, 64 x 32 0.88 and 10.6, the 32 x 32 tile kept
# from the FMA dots 2.2 and 11.4 (perf/moe_fp32_tf32x3.py). 128-wide spills at the widest block_m on
# sm_120, so it and other families take 64 x 32 (offline_builds).
FP32_TILES = {"sm_90": (128, 32), "sm_100": (128, 32)}
FP32_TILE = (64, 32)


def _for_dtype(g: GemmConfig, dtype: torch.dtype, family: str) -> GemmConfig:
    """The GEMM's tiling for dtype on a family: float32 replaces the 2-byte one's (FP32_TILES)."""
    if dtype.itemsize <= 2:
        return g
    block_n, block_k = FP32_TILES.get(family, FP32_TILE)
    return replace(g, block_k=block_k, block_n=block_n, num_warps=8, num_stages=3)


def _tile_constexprs(g: GemmConfig, k_dim: int) -> dict:
    return dict(EVEN_K=k_dim % g.block_k == 0, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m)


def _combine_blocks(N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the combine: 2048 outputs per program."""
    block_n = min(256, triton.next_power_of_2(N))
    return max(1, 2048 // block_n), block_n


def launch_moe_experts(x, weights, indices, w1, b1, w2, b2, activation: str, *,
                       config: Optional[MoeConfig] = None, atomic: Optional[bool] = None) -> torch.Tensor:
    """y [M, N] in x's dtype. `atomic` None reads FUSED_OPS_MOE_ATOMIC; `config` None uses pick_config."""
    M, K = x.shape
    E, H = w1.shape[0], w1.shape[1]
    N = w2.shape[1]
    top_k = indices.shape[1]
    n_pairs = M * top_k
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if atomic is None:
        atomic = os.environ.get(ATOMIC_ENV, "0") == "1"
    cfg = config or pick_config(n_pairs, E, x.device)
    family = tuning.device_family(x.device)
    g1, g2 = _for_dtype(cfg.gemm1, x.dtype, family), _for_dtype(cfg.gemm2, x.dtype, family)
    pairs, tile_bucket = launch_moe_align(indices, E, cfg.block_m)
    n_tiles = tile_bucket.numel()
    common = dict(SWAP_AB=cfg.swap_ab, DOT_F32=dot_upcast(x), PRECISION=gemm_precision(x.dtype, x.device),
                  BLOCK_M=cfg.block_m)

    h = torch.empty((n_pairs, H), dtype=x.dtype, device=x.device)
    tma = x.dtype.itemsize == 2 and w1.is_contiguous() and w2.is_contiguous() and tma_ok(w1, w2)
    w1_desc = TensorDescriptor.from_tensor(w1.view(E * H, K), [g1.block_n, g1.block_k]) if tma else w1
    w2_desc = TensorDescriptor.from_tensor(w2.view(E * N, H), [g2.block_n, g2.block_k]) if tma else w2
    b1_ = w1 if b1 is None else b1                  # placeholder pointer when there is no bias
    moe_gemm1_kernel[(n_tiles * triton.cdiv(H, g1.block_n),)](
        x, w1, w1_desc, b1_, h, pairs, tile_bucket, n_pairs, top_k, E, n_tiles, K, H,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
        0 if b1 is None else b1.stride(0), 0 if b1 is None else b1.stride(1), h.stride(0),
        HAS_BIAS=b1 is not None, ACTIVATION=activation, TMA=tma, **_tile_constexprs(g1, K), **common,
        num_warps=g1.num_warps, num_stages=g1.num_stages, enable_fp_fusion=FP_FUSION)

    if atomic:
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        out = y if top_k == 1 else torch.empty((n_pairs, N), dtype=x.dtype, device=x.device)
    b2_ = w2 if b2 is None else b2
    moe_gemm2_kernel[(n_tiles * triton.cdiv(N, g2.block_n),)](
        h, w2, w2_desc, b2_, weights, out, pairs, tile_bucket, n_pairs, top_k, E, n_tiles, H, N,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
        0 if b2 is None else b2.stride(0), 0 if b2 is None else b2.stride(1),
        weights.stride(0), weights.stride(1), out.stride(0),
        HAS_BIAS=b2 is not None, ATOMIC=atomic, TMA=tma, **_tile_constexprs(g2, H), **common,
        num_warps=g2.num_warps, num_stages=g2.num_stages, enable_fp_fusion=FP_FUSION)

    if atomic:
        return out if x.dtype == torch.float32 else out.to(x.dtype)
    if top_k > 1:
        block_m, block_n = _combine_blocks(N)
        moe_combine_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            out, y, M, N, top_k, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=FP_FUSION)
    return y


def shipped_configs() -> list:
    """(label, config, compile targets) of every config a launcher can choose: both fallback
    tables and every entry of the shipped JSON."""
    configs = [(f"pairs{limit or 'max'}_sm{targets[0]}", cfg, targets)
               for table, targets in ((CONFIGS_SM90, (90, 100)), (CONFIGS_SMALL_SMEM, (120,)))
               for limit, cfg in table]
    configs += [(label, config_from_json(entry), targets)
                for targets, label, entry in tuning.shipped_entries("moe_experts")]
    return configs


def offline_builds():
    """Every shipped GEMM config at the reference shape (bf16, plus its odd-K variant; float32 as
    launched without tf32: tf32x3 at each family's tile, which takes mma.sync where a swapped dot has
    fewer than the 64 rows a wgmma needs, so the family's instruction is not asked of it), the combine
    and the routing kernels."""
    from . import moe_align
    from .offline import KernelBuild
    K, H, N = 8320, 4096, 1536                   # FuseMoE's shape: sizes and strides divisible by 16
    divisible = ("K", "H", "N", "stride_xm", "stride_we", "stride_wh", "stride_wn", "stride_be", "stride_hp",
                 "stride_om")
    configs = shipped_configs()
    builds = []
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        types = {name: f"*{dt}" for name in ("x_ptr", "w_ptr", "b_ptr", "h_ptr", "out_ptr", "o_ptr", "y_ptr")}
        types.update({"pairs_ptr": "*i32", "tile_bucket_ptr": "*i32", "rw_ptr": "*fp32"})
        types.update({name: "i32" for name in ("n_pairs", "top_k", "n_experts", "n_tiles", "M", "stride_rm",
                                               *divisible)})
        common = dict(HAS_BIAS=True, DOT_F32=False, PRECISION="tf32x3" if dt == "fp32" else "ieee", stride_xk=1,
                      stride_wk=1, stride_bh=1, stride_bn=1, stride_rj=1)
        # float32's tile is its family's (_for_dtype): one build per target
        for label, cfg, targets in (configs if dt == "bf16" else
                                    [(f"{label}_sm{cc}", cfg, (cc,)) for label, cfg, targets in configs
                                     for cc in targets]):
            gemms = (("gemm1", moe_gemm1_kernel, cfg.gemm1, K, {"ACTIVATION": "gelu_tanh"}),
                     ("gemm2", moe_gemm2_kernel, cfg.gemm2, H, {"ATOMIC": False}))
            tma_targets = tuple(cc for cc in targets if cc // 10 in TMA_FAMILIES) if dt == "bf16" else ()
            for name, kernel, g, k_dim, flags in gemms:
                g = _for_dtype(g, dtype, tuning.family_of(targets[0] // 10))
                # pointers everywhere (the fallback of odd strides); descriptors where launches take them
                variants = [(odd, False, targets) for odd in ((False, True) if dt == "bf16" else (False,))]
                variants += [(odd, True, tma_targets) for odd in (False, True) if tma_targets]
                for odd, tma, build_targets in variants:
                    constexprs = {k: v for k, v in common.items() if k in kernel.arg_names}
                    constexprs.update(flags, SWAP_AB=cfg.swap_ab, BLOCK_M=cfg.block_m, TMA=tma,
                                      **_tile_constexprs(g, k_dim + odd))
                    desc = f"tensordesc<{dt}[{g.block_n}, {g.block_k}]>" if tma else f"*{dt}"
                    builds.append(KernelBuild(
                        f"moe_{name}_{dt}_{label}{'_oddk' if odd else ''}{'_tma' if tma else ''}", kernel,
                        {**types, "w_desc": desc}, constexprs, num_warps=g.num_warps, num_stages=g.num_stages,
                        uses_dot=dt == "bf16", targets=build_targets, divisible=divisible))
        block_m, block_n = _combine_blocks(N)
        builds.append(KernelBuild(f"moe_combine_{dt}", moe_combine_kernel, types,
                                  dict(BLOCK_M=block_m, BLOCK_N=block_n), divisible=("N",)))
    return builds + moe_align.offline_builds(sorted({cfg.block_m for _, cfg, _ in configs}))


def _moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                    b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                    activation: str) -> torch.Tensor:
    kernel = use_triton(x) and x.dtype in TL_DTYPE
    if not kernel or x.device.type != "cuda":   # no device sync to pay for here: raise as the reference does
        reference.check_indices_range(indices, w1.shape[0])
    if kernel:
        return launch_moe_experts(x, weights, indices, w1, b1, w2, b2, activation)
    return reference._moe_experts(x, weights, indices, w1, b1, w2, b2, activation)


_moe_experts_op = torch.library.custom_op("fused_ops::moe_experts", mutates_args=())(_moe_experts)


@_moe_experts_op.register_fake
def _(x, weights, indices, w1, b1, w2, b2, activation):
    return x.new_empty((x.shape[0], w2.shape[1]))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor], *,
                activation: str = "gelu_tanh") -> torch.Tensor:
    """Top-k MoE FFN: y [M, N] = sum_j weights[:, j] * expert_{indices[:, j]}(x), in x's dtype.

    On CUDA, rows of tokens with an index outside [0, E) come out NaN (no host sync to raise).
    """
    reference.check_moe_experts(x, weights, indices, w1, b1, w2, b2, activation)
    op = _moe_experts if skips_dispatcher(x, weights, indices, w1, b1, w2, b2) else _moe_experts_op
    return op(x, weights, indices, w1, b1, w2, b2, activation)
