"""topk_gating: the k largest values per row, descending, ties to the lower index, NaN last.

Each value becomes an order-preserving int32 key (NaN maps just above the "taken" sentinel),
packed with its column into an int64, so one integer max per pick finds the next winner, k times.
The `topk_tile` helper is shared with the fused router.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference, tuning
from ._runtime import FP_FUSION, pow2, row_tiles, rows, skips_dispatcher, use_triton

TAKEN = tl.constexpr(-2147483648)     # int32 min: a column already picked, or padding
NAN_KEY = tl.constexpr(-2147483647)   # just above TAKEN: NaN ranks below every number, -inf included
MAX_SINGLE_BLOCK = 8192       # widest row handled by one program (no spills); wider rows use the reference path


@triton.jit
def ordered_key(x):
    """float32 -> int32 with the same order; +0 and -0 share a key; NaN -> NAN_KEY."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x == 0.0, 0, key)
    return tl.where(x != x, NAN_KEY, key)


@triton.jit
def key_value(key):
    """Inverse of ordered_key (the map is its own inverse on non-NaN keys)."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    value = bits.to(tl.float32, bitcast=True)
    return tl.where(key == NAN_KEY, float("nan"), value)


@triton.jit
def topk_tile(x, col, valid, k, BLOCK_K: tl.constexpr):
    """Top-k of each row of a [BM, BE] float32 tile; `col` the column ids, `valid` the live lanes.

    Returns (values [BM, BLOCK_K] float32, indices [BM, BLOCK_K] int32); lanes >= k are 0.
    Key and column are packed into one int64 (key high, BE-1-col low) so one max per pick finds
    the largest key and, among equal keys, the lowest column.
    """
    BE: tl.constexpr = x.shape[1]
    key = tl.where(valid, ordered_key(x), TAKEN)
    # (tensor first in the arithmetic: the interpreter turns constexpr - tensor into a constexpr)
    packed = (key.to(tl.int64) << 32) | (col.to(tl.int64) * -1 + (BE - 1))
    taken = tl.full(packed.shape, TAKEN, tl.int64) << 32
    slot = tl.arange(0, BLOCK_K)[None, :]
    values = tl.zeros([x.shape[0], BLOCK_K], tl.float32)
    indices = tl.zeros([x.shape[0], BLOCK_K], tl.int32)
    for j in range(k):
        best = tl.max(packed, axis=1)
        idx = ((best & 0xFFFFFFFF) * -1 + (BE - 1)).to(tl.int32)
        packed = tl.where(col == idx[:, None], taken, packed)
        values = tl.where(slot == j, key_value((best >> 32).to(tl.int32))[:, None], values)
        indices = tl.where(slot == j, idx[:, None], indices)
    return values, indices


@triton.jit
def top_k_mask(key, k):
    """The k largest of each row of a [BM, BN] int32 key tile (k <= BN), ties at the k-th key to
    the lowest columns: a bool mask. The k-th key is found by bisection over the key range
    (count the keys at or above the middle, keep the half that holds it), which stops once a
    row's count is exactly k: at most 33 passes (the key range halves) of a compare and a sum,
    where picking the k winners one by one takes k passes of an int64 max and two selects."""
    BN: tl.constexpr = key.shape[1]
    lo = tl.min(key, axis=1).to(tl.int64)           # count(key >= lo) >= k
    hi = tl.max(key, axis=1).to(tl.int64) + 1       # count(key >= hi) < k
    n_lo = tl.full(lo.shape, BN, tl.int32)
    while tl.max(((hi - lo > 1) & (n_lo != k)).to(tl.int32), axis=0) > 0:
        mid = tl.where(n_lo == k, lo, lo + (hi - lo) // 2)      # a finished row stays where it is
        n_mid = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        up = n_mid >= k
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid)
        n_lo = tl.where(up, n_mid, n_lo)
    # every key above lo, and of the keys equal to lo the first (k - those above)
    threshold = lo.to(tl.int32)[:, None]
    above = key > threshold
    tied = (key == threshold).to(tl.int32)
    room = k - tl.sum(above.to(tl.int32), axis=1)
    return above | ((tied > 0) & (tl.cumsum(tied, axis=1) <= room[:, None]))


@triton.jit
def topk_gating_kernel(p_ptr, w_ptr, i_ptr, n_rows, n_cols, stride_p, k, RENORMALIZE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row64 = row.to(tl.int64)
    col = tl.arange(0, BLOCK_E)[None, :]
    valid = (row[:, None] < n_rows) & (col < n_cols)
    x = tl.load(p_ptr + row64[:, None] * stride_p + col, mask=valid, other=0.0).to(tl.float32)
    values, indices = topk_tile(x, col, valid, k, BLOCK_K)
    if RENORMALIZE:
        values = values / tl.sum(values, axis=1)[:, None]
    slot = tl.arange(0, BLOCK_K)[None, :]
    out_mask = (row[:, None] < n_rows) & (slot < k)
    tl.store(w_ptr + row64[:, None] * k + slot, values, mask=out_mask)
    tl.store(i_ptr + row64[:, None] * k + slot, indices, mask=out_mask)


# ---------------------------------------------------------------------------------------------
# configs: the shipped JSON for this device (tuning.py), else the whole-row heuristic
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopkConfig:
    """One launch's blocks: BLOCK_M whole rows (BLOCK_E, the row width to a power of two) a program."""
    block_m: int
    num_warps: int


def config_from_json(entry: dict) -> TopkConfig:
    return TopkConfig(**entry)


def topk_bucket(n_rows: int, n_cols: int) -> str:
    """Rows and columns to powers of two: the key a launch's config is stored under (k is not part
    of it: it changes the picks, not the tile)."""
    return tuning.pow2_bucket(M=n_rows, E=n_cols)


def bucket_shape(bucket: str) -> tuple[int, int]:
    """'M64_E128' -> (64, 128)."""
    m, e = bucket.split("_")
    return int(m[1:]), int(e[1:])


def fallback_config(bucket: str, family: str) -> TopkConfig:
    """The built-in config (the same on every family): about 2K values per program, 16 a thread."""
    block_m, _, num_warps = row_tiles(*bucket_shape(bucket))
    return TopkConfig(block_m, num_warps)


def launch_topk_gating(probs: torch.Tensor, k: int, renormalize: bool, config: Optional[TopkConfig] = None):
    p = rows(probs)
    n_rows, n_cols = p.shape
    weights = torch.empty((n_rows, k), dtype=torch.float32, device=p.device)
    indices = torch.empty((n_rows, k), dtype=torch.int32, device=p.device)
    if n_rows > 0:
        if config is None:
            config = tuning.config_for("topk_gating", topk_bucket(n_rows, n_cols), fallback_config, config_from_json)
        topk_gating_kernel[(triton.cdiv(n_rows, config.block_m),)](
            p, weights, indices, n_rows, n_cols, p.stride(0), k, RENORMALIZE=renormalize,
            BLOCK_M=config.block_m, BLOCK_E=pow2(n_cols), BLOCK_K=pow2(k), num_warps=config.num_warps,
            enable_fp_fusion=FP_FUSION)
    out_shape = (*probs.shape[:-1], k)
    return weights.reshape(out_shape), indices.reshape(out_shape)


def shipped_configs() -> dict:
    """Every (config, BLOCK_E) the launcher can choose -> compile targets: the fallback of each
    width at a few and at many rows, and every shipped JSON entry (its file's family only)."""
    every = tuple(tuning.FAMILY_CC.values())
    configs = {}
    for n_rows in (32, 1 << 20):
        for n_cols in (8, 64, 128, 512, MAX_SINGLE_BLOCK):
            configs[(fallback_config(topk_bucket(n_rows, n_cols), "generic"), pow2(n_cols))] = every
    for targets, _, bucket, entry in tuning.shipped_buckets("topk_gating"):
        key = (config_from_json(entry), bucket_shape(bucket)[1])
        configs[key] = tuple(sorted(set(configs.get(key, ())) | set(targets)))
    return configs


def offline_builds():
    """Each shipped config with 8 picks (FuseMoE's widest k), fewer where the row is narrower."""
    from .offline import KernelBuild
    types = {"p_ptr": "*fp32", "w_ptr": "*fp32", "i_ptr": "*i32", "n_rows": "i32", "n_cols": "i32",
             "stride_p": "i32", "k": "i32"}
    builds = []
    for (c, block_e), targets in shipped_configs().items():
        block_k = min(8, block_e)
        builds.append(KernelBuild(f"topk_E{block_e}_M{c.block_m}_w{c.num_warps}_k{block_k}", topk_gating_kernel, types,
                                  {"RENORMALIZE": True, "BLOCK_M": c.block_m, "BLOCK_E": block_e, "BLOCK_K": block_k},
                                  num_warps=c.num_warps, targets=targets))
    return builds


def _topk_gating(probs: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(probs) and probs.shape[-1] <= MAX_SINGLE_BLOCK:
        return launch_topk_gating(probs, k, renormalize)
    w, i = reference._topk_gating(probs, k, renormalize)
    return w.to(torch.float32), i


_topk_gating_op = torch.library.custom_op("fused_ops::topk_gating", mutates_args=())(_topk_gating)


@_topk_gating_op.register_fake
def _(probs, k, renormalize):
    shape = (*probs.shape[:-1], k)
    return probs.new_empty(shape, dtype=torch.float32), probs.new_empty(shape, dtype=torch.int32)


def topk_gating(probs: torch.Tensor, k: int, *, renormalize: bool = False):
    """(weights float32 [..., k], indices int32 [..., k]) of the k largest entries per row."""
    reference.check_topk_gating(probs, k)
    op = _topk_gating if skips_dispatcher(probs) else _topk_gating_op
    return op(probs, k, bool(renormalize))
