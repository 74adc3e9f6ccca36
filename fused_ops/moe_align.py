"""Routing metadata for the MoE grouped GEMMs, built on the device without a host sync.

The M*k (token, slot) pairs of `indices [M, k]` are numbered p = m * k + j and grouped into buckets:
bucket e < E holds the pairs routed to expert e, bucket E the pairs whose index lies outside
[0, E) (the GEMMs turn those tokens' output rows into NaN). Each bucket starts on a multiple of
BLOCK_M, so a BLOCK_M tile of the sorted list belongs to one bucket:

  pairs [n_tiles * BLOCK_M] int32   pair ids, bucket by bucket, in pair order within a bucket;
                                    the tail of each bucket's last tile holds the sentinel n_pairs
  tile_bucket [n_tiles] int32       the bucket of each tile; E + 1 for tiles past the last bucket

n_tiles is the worst case over all routings, fixed on the host from the shapes alone; the real
counts live only on the device. Small problems take one program (one launch); larger ones count
per chunk of pairs, prefix-sum the chunk counts with torch.cumsum, then scatter (three launches).
Bucket membership is found with [pairs, buckets] one-hot tiles, so the work per pair grows with E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import FP_FUSION, pow2

ONE_HOT_ELEMENTS = 4096          # [pairs, buckets] one-hot tile held per loop step
SINGLE_PROGRAM_WORK = 1 << 16    # pairs x buckets handled by a single program (one launch)


@triton.jit
def _buckets(idx_ptr, pair, stop, top_k, stride_m, stride_j, n_experts):
    """Bucket of each pair: its expert, n_experts for an index outside [0, E), -1 at or past `stop`."""
    live = pair < stop
    token = pair // top_k
    slot = pair - token * top_k
    e = tl.load(idx_ptr + token.to(tl.int64) * stride_m + slot * stride_j, mask=live, other=0)
    bucket = tl.where((e >= 0) & (e < n_experts), e, n_experts).to(tl.int32)
    return tl.where(live, bucket, -1)


@triton.jit
def _count(idx_ptr, start, stop, top_k, stride_m, stride_j, n_experts,
           SUB: tl.constexpr, BLOCK_B: tl.constexpr):
    """Pairs per bucket among pairs [start, stop)."""
    bucket_id = tl.arange(0, BLOCK_B)
    counts = tl.zeros([BLOCK_B], tl.int32)
    for s in range(start, stop, SUB):
        b = _buckets(idx_ptr, s + tl.arange(0, SUB), stop, top_k, stride_m, stride_j, n_experts)
        counts += tl.sum((b[:, None] == bucket_id[None, :]).to(tl.int32), axis=0)
    return counts


@triton.jit
def moe_count_kernel(idx_ptr, counts_ptr, n_pairs, top_k, stride_m, stride_j, n_experts, chunk,
                     SUB: tl.constexpr, BLOCK_B: tl.constexpr):
    """counts[c, b] = pairs of bucket b in chunk c (pairs [c * chunk, (c + 1) * chunk))."""
    c = tl.program_id(0)
    start = c * chunk
    stop = tl.minimum(start + chunk, n_pairs)
    counts = _count(idx_ptr, start, stop, top_k, stride_m, stride_j, n_experts, SUB, BLOCK_B)
    tl.store(counts_ptr + c * BLOCK_B + tl.arange(0, BLOCK_B), counts)


@triton.jit
def moe_scatter_kernel(idx_ptr, prefix_ptr, pairs_ptr, tile_bucket_ptr, n_pairs, top_k, stride_m, stride_j,
                       n_experts, chunk, n_chunks, n_tiles, tiles_per_program,
                       BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_T: tl.constexpr, SINGLE: tl.constexpr):
    """Program c places the pairs of chunk c and fills the tile table (and padding) of its tiles.

    SINGLE: one program counts everything itself; else prefix_ptr holds the inclusive prefix sum
    over chunks of moe_count_kernel's counts, [n_chunks, BLOCK_B].
    """
    c = tl.program_id(0)
    bucket_id = tl.arange(0, BLOCK_B)
    if SINGLE:
        total = _count(idx_ptr, 0, n_pairs, top_k, stride_m, stride_j, n_experts, SUB, BLOCK_B)
        before = tl.zeros([BLOCK_B], tl.int32)
    else:
        total = tl.load(prefix_ptr + (n_chunks - 1) * BLOCK_B + bucket_id)
        before = tl.load(prefix_ptr + tl.maximum(c - 1, 0) * BLOCK_B + bucket_id)
        before = tl.where(c > 0, before, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    seg_end = tl.cumsum(padded, axis=0)
    seg_start = seg_end - padded

    # the chunk's pairs: slot = bucket start + pairs of the bucket before this one (stable order)
    start = c * chunk
    stop = tl.minimum(start + chunk, n_pairs)
    placed = seg_start + before
    for s in range(start, stop, SUB):
        pair = s + tl.arange(0, SUB)
        hit = _buckets(idx_ptr, pair, stop, top_k, stride_m, stride_j, n_experts)[:, None] == bucket_id[None, :]
        hit_i = hit.to(tl.int32)
        rank = tl.cumsum(hit_i, axis=0) - hit_i
        slot = tl.sum(tl.where(hit, placed[None, :] + rank, 0), axis=1)
        tl.store(pairs_ptr + slot, pair, mask=pair < stop)
        placed += tl.sum(hit_i, axis=0)

    # this program's tiles: their bucket, and the sentinel in rows past the bucket's last pair
    real_bucket = bucket_id <= n_experts
    fill_from = seg_start + total
    t_stop = tl.minimum((c + 1) * tiles_per_program, n_tiles)
    for t0 in range(c * tiles_per_program, t_stop, BLOCK_T):
        tile = t0 + tl.arange(0, BLOCK_T)
        row0 = tile * BLOCK_M
        ended = (seg_end[None, :] <= row0[:, None]) & real_bucket[None, :]
        bucket = tl.sum(ended.to(tl.int32), axis=1)          # n_experts + 1 past the last bucket
        tl.store(tile_bucket_ptr + tile, bucket, mask=tile < t_stop)
        first_pad = tl.sum(tl.where(bucket[:, None] == bucket_id[None, :], fill_from[None, :], 0), axis=1)
        row = row0[:, None] + tl.arange(0, BLOCK_M)[None, :]
        pad = (row >= first_pad[:, None]) & (bucket <= n_experts)[:, None] & (tile < t_stop)[:, None]
        tl.store(pairs_ptr + row, tl.full([BLOCK_T, BLOCK_M], 0, tl.int32) + n_pairs, mask=pad)


def max_tiles(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Tiles of the worst routing: every non-empty bucket (at most min(E + 1, pairs)) wastes < BLOCK_M rows."""
    return (n_pairs + min(n_experts + 1, n_pairs) * (block_m - 1)) // block_m


def _blocks(n_experts: int, block_m: int) -> tuple[int, int, int, int]:
    """(BLOCK_B buckets, SUB pairs, BLOCK_T tiles, num_warps): one-hot tiles of about
    ONE_HOT_ELEMENTS; the warp counts are those that ptxas compiles without spills."""
    block_b = pow2(n_experts + 1)
    sub = max(1, ONE_HOT_ELEMENTS // block_b)
    block_t = max(1, min(64, ONE_HOT_ELEMENTS // max(block_b, block_m)))
    return block_b, sub, block_t, 2 if block_b < 64 else 8


def launch_moe_align(indices: torch.Tensor, n_experts: int, block_m: int, chunk: int | None = None):
    """(pairs, tile_bucket) for `indices [M, k]` (int32 or int64, any strides); see the module doc.

    `chunk` (pairs per program) overrides the size-based choice between one and three launches.
    """
    n_pairs = indices.numel()
    top_k = indices.shape[1]
    n_tiles = max_tiles(n_pairs, n_experts, block_m)
    dev = indices.device
    pairs = torch.empty(n_tiles * block_m, dtype=torch.int32, device=dev)
    tile_bucket = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    if n_tiles == 0:
        return pairs, tile_bucket
    block_b, sub, block_t, warps = _blocks(n_experts, block_m)
    if chunk is None:
        chunk = n_pairs if n_pairs * block_b <= SINGLE_PROGRAM_WORK else max(sub, SINGLE_PROGRAM_WORK // block_b)
    n_chunks = triton.cdiv(n_pairs, chunk)
    args = (n_pairs, top_k, indices.stride(0), indices.stride(1), n_experts)
    if n_chunks == 1:
        prefix = tile_bucket                       # unused by the single-program kernel
    else:
        counts = torch.empty((n_chunks, block_b), dtype=torch.int32, device=dev)
        moe_count_kernel[(n_chunks,)](indices, counts, *args, chunk, SUB=sub, BLOCK_B=block_b,
                                      num_warps=warps, enable_fp_fusion=FP_FUSION)
        prefix = torch.cumsum(counts, dim=0, dtype=torch.int32)
    moe_scatter_kernel[(n_chunks,)](indices, prefix, pairs, tile_bucket, *args, chunk, n_chunks, n_tiles,
                                    triton.cdiv(n_tiles, n_chunks), BLOCK_M=block_m, SUB=sub,
                                    BLOCK_B=block_b, BLOCK_T=block_t, SINGLE=n_chunks == 1,
                                    num_warps=warps, enable_fp_fusion=FP_FUSION)
    return pairs, tile_bucket


def offline_builds(block_ms):
    """Both kernels at E = 8, 64 and 256 for each routing alignment in `block_ms`."""
    from .offline import KernelBuild
    types = {"idx_ptr": "*i32", "counts_ptr": "*i32", "prefix_ptr": "*i32", "pairs_ptr": "*i32",
             "tile_bucket_ptr": "*i32", **{name: "i32" for name in (
                 "n_pairs", "top_k", "stride_m", "stride_j", "n_experts", "chunk", "n_chunks", "n_tiles",
                 "tiles_per_program")}}
    builds = []
    for n_experts in (8, 64, 256):
        for block_m in sorted(set(block_ms)):
            block_b, sub, block_t, warps = _blocks(n_experts, block_m)
            for single in (True, False):
                builds.append(KernelBuild(
                    f"moe_align_scatter_E{n_experts}_m{block_m}{'_single' if single else ''}", moe_scatter_kernel,
                    types, dict(stride_j=1, BLOCK_M=block_m, SUB=sub, BLOCK_B=block_b, BLOCK_T=block_t,
                                SINGLE=single), num_warps=warps))
        builds.append(KernelBuild(f"moe_align_count_E{n_experts}", moe_count_kernel, types,
                                  dict(stride_j=1, SUB=sub, BLOCK_B=block_b), num_warps=warps))
    return builds
