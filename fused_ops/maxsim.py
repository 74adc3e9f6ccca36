"""MaxSim (late interaction): padded, packed and top-k scoring with one Triton kernel.

scores[q, n] = sum_{i < q_len[q]} max_{j < len[n]} <Q[q, i], D[n, j]>   (divided by q_len for "mean")

How the work is laid out
- Rows (the M dim of the dot): the query tokens of the whole call are flattened. A row block of
  BLOCK_Q rows holds `qpb` whole queries when Lq <= BLOCK_Q (row r -> query r // Lq), or one
  BLOCK_Q-token slice ("split") of one query when Lq > BLOCK_Q. Splits are row blocks of their
  own: each writes its partial sums to a [n_splits, Nq, Nd] buffer that the launcher adds up in
  a fixed order (deterministic; only queries longer than BLOCK_Q pay for it).
- Documents: a program takes a group of `group` consecutive documents. A document is a start row
  and a real length (padded: n * D.stride(0) and d_lengths[n]; packed: doc_offsets[n] and
  offsets[n + 1] - offsets[n]), so both layouts share the kernel. Only real tokens are read, in
  BLOCK_D chunks; the chunks of a program's documents form one flat loop, so the load pipeline
  runs across document boundaries. S = Q_rows @ chunk^T stays on chip (fp32 accumulation, bf16/fp16
  operands as they are). A document's last chunk reads its last token again in the rows past
  its length, so S has no padded column and needs no mask before the row max (a select per
  element of S was a fifth of the loop's instructions: perf/maxsim_chunk_cost.py); rows of
  absent query tokens add 0 to the per-query sums (never -inf * 0).
- Per-document sums (16-bit): when a document ends, each row's max goes into a [BLOCK_Q, WINDOW]
  register tile, and the rows are summed per query once per WINDOW documents (the scoring path:
  once, after the loop; the top-k path, whose GROUP reaches 1024 documents: every 16). Summing
  them as each document ends is a reduction across warps (shared memory and barriers) per
  document; without it, two 4-warp programs per SM overlap well (one's dot beside the other's row
  maxima): on the H200 the 128 x 64 tile at 4 warps went from 0.707 to 0.650 ms (Nq=16, Nd=10k)
  and 0.670 to 0.587 ms (ColPali). float32 (WINDOW = 0)
  keeps the per-document sums, as do top-k tiles where the windows' registers would spill
  (doc_window).
- Tokens are rows of d contiguous elements and every offset is a whole number of rows, so the
  compiler sees each address as a multiple of d and copies chunks to shared memory in 16-byte
  pieces whenever d is a multiple of 8 (other d take a small tile, see _family).
- Grid: document groups x row blocks, row blocks fastest, so the programs that read one
  document group run side by side and D comes from HBM about once per call (repeats hit L2).
- maxsim_topk: groups grow to hundreds of documents; a program keeps its group's scores in
  registers, finds each query's k-th best by bisection over the order-preserving score keys
  (topk.top_k_mask: at most 33 count passes; k picks of an int64 max took 35.6 against 34.0 ms
  at Nq=16, Nd=1M, k=100 on the H200) and writes only those k, as int64 keys that order scores
  the way the ranking does (ties to the lower index, NaN last) and name the document
  (decode_keys); a torch.topk over the [Nq, groups * k] keys picks the final k (0.15 ms against
  0.47 for ranked_topk's two stable sorts of scores). A bitonic tl.topk in the kernel lost to the
  picks (40.31 against 40.25 ms in its run). The top-k path is tuned apart ("maxsim_topk"
  entries), and its 8-warp tilings may cap registers at 128 a thread (Tiling.max_registers): the
  score tile takes such a program past 128, and under it two programs share an SM (on the H200
  the 256 x 64 tile went from 36.6 to 31.7 ms). perf/results/NVIDIA_H200/maxsim_topk_ab.txt.
  The [Nq, Nd] scores are never written (unless k > group / 2 or a query is longer than BLOCK_Q).
- Lengths and offsets are clamped to the tensor they index, so bad values (unchecked during
  CUDA-graph capture) can give wrong scores but never read out of bounds.

Compiler notes (triton 3.6 and 3.9; fused_ops.offline builds every tile the launcher picks)
- The chunk loop is the only loop around the dot: a loop over splits around the pipelined chunk loop
  cost 50-90 registers and made ptxas spill, so splits went to the grid.
- No branch reads S: one (a full-chunk shortcut, when S's columns were masked) made triton 3.6's
  Hopper pipeliner fail ("PassManager::run failed" in TritonGPUPipeline) for wgmma dots.
- Values wanted only after the loop are computed after it (see the end of the kernel): ptxas
  spills values that live through the loop unused to stay within a register-occupancy step.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference, tuning
from .launch_plans import LaunchPlans, current_stream, plans_apply
from ._runtime import FP_FUSION, TL_DTYPE, dot_precision, dot_upcast, gemm_precision, pow2, skips_dispatcher, use_triton
from .topk import NAN_KEY, ordered_key, top_k_mask

MAX_QPB = 8                       # queries per row block (bounds the [BLOCK_Q, QPB_PAD] ownership tile)
SCORE_GROUP = 16                  # documents per program on the scoring path, at most
TOPK_TILE_PER_THREAD = 16         # QPB_PAD * GROUP / threads: the top-k path's score tile in registers
MAX_TOPK_GROUP = 1024             # documents per program on the top-k path, at most
DOC_MASK = 0xFFFFFFFF             # the document index's bits in a candidate key (inverted)
SMEM_SLACK = 4096                 # shared memory Triton needs besides the tiles (reduction scratch)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _doc_span(span_ptr, n, live, n_tokens, d_rows, DIM: tl.constexpr, PACKED: tl.constexpr, HAS_SPAN: tl.constexpr):
    """(offset of the first element, real length) of document(s) n, clamped to the tensor; 0 where not live."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(span_ptr + n, mask=live, other=0).to(tl.int64), 0), n_tokens)
        end = tl.minimum(tl.maximum(tl.load(span_ptr + n + 1, mask=live, other=0).to(tl.int64), start), n_tokens)
        first = start * DIM
        length = (end - start).to(tl.int32)
    else:
        first = n.to(tl.int64) * d_rows * DIM
        if HAS_SPAN:
            length = tl.minimum(tl.maximum(tl.load(span_ptr + n, mask=live, other=0).to(tl.int32), 0), n_tokens)
        else:
            length = tl.where(live, n_tokens, 0)
    return first, length


@triton.jit
def _window_sums(acc_windows, acc_rows, window, j, row_ok):
    """acc_windows [QPB_PAD, windows, WINDOW] with window `window` replaced by the sums of acc_rows
    [BLOCK_Q, WINDOW] over each query's present rows (row r belongs to query j[r]); one query at a
    time, so few registers are live."""
    QPB_PAD: tl.constexpr = acc_windows.shape[0]
    query = tl.arange(0, QPB_PAD)[:, None, None]
    at = tl.arange(0, acc_windows.shape[1])[None, :, None] == window
    for jj in tl.static_range(QPB_PAD):
        sums = tl.sum(tl.where(((j == jj) & row_ok)[:, None], acc_rows, 0.0), axis=0)
        acc_windows = tl.where((query == jj) & at, sums[None, None, :], acc_windows)
    return acc_windows


@triton.jit
def maxsim_kernel(q_ptr, d_ptr, span_ptr, q_len_ptr, out_ptr,
                  n_queries, n_docs, q_tokens, n_tokens, lq_tile, qpb, n_splits, group, k, q_rows, d_rows,
                  stride_os, stride_on,
                  DIM: tl.constexpr, PACKED: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_Q_LEN: tl.constexpr,
                  MEAN: tl.constexpr, TOPK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_K: tl.constexpr, QPB_PAD: tl.constexpr, GROUP: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr):
    """One program: `group` (<= GROUP) documents x one row block (qpb queries, or one split).

    n_tokens: the padded length Ld, or the row count T of the packed layout. q_rows, d_rows: the
    batch strides of Q and padded D in rows of DIM elements. stride_os: the stride of out's split
    dim ([n_splits, Nq, Nd] partial sums; n_splits = 1 unless Lq > BLOCK_Q).
    The chunks of all the group's documents form one flat loop; the (document, offset) of the next
    chunk does not depend on the dot, so the loads of later chunks are in flight while this one is
    scored. An empty document takes one fully masked chunk, which leaves its row maxima at -inf.
    TOPK: write the group's top k per query to out [Nq, groups * k] (int64 candidate keys, see
    decode_keys) instead of all scores.
    WINDOW (a power of two dividing GROUP, or 0): keep each row's max per document and sum the rows
    per query once per WINDOW documents, instead of as each document ends (0).
    """
    n_blocks = tl.cdiv(n_queries, qpb) * n_splits
    block = tl.program_id(0) % n_blocks
    dg = tl.program_id(0) // n_blocks
    qg = block // n_splits
    split = block % n_splits
    k_off = tl.arange(0, BLOCK_K)
    t_off = tl.arange(0, BLOCK_D)

    # the rows: row r is token (split * lq_tile + r % lq_tile) of local query r // lq_tile
    r = tl.arange(0, BLOCK_Q)
    j = r // lq_tile
    query_r = qg * qpb + j
    live_r = (j < qpb) & (query_r < n_queries)
    if HAS_Q_LEN:
        len_r = tl.minimum(tl.maximum(tl.load(q_len_ptr + query_r, mask=live_r, other=0).to(tl.int32), 0), q_tokens)
    else:
        len_r = tl.where(live_r, q_tokens, 0)
    tok_q = split * lq_tile + (r - j * lq_tile)
    row_ok = tok_q < len_r
    q_row = query_r.to(tl.int64) * q_rows + tok_q
    q = tl.load(q_ptr + q_row[:, None] * DIM + k_off[None, :], mask=row_ok[:, None] & (k_off[None, :] < DIM),
                other=0.0)
    rows_of = (j[:, None] == tl.arange(0, QPB_PAD)[None, :]) & row_ok[:, None]   # [BLOCK_Q, QPB_PAD]: r adds to j

    # the documents of this group, and their chunk count (none when a split is past every query's end)
    n0 = dg * group
    n_end = tl.minimum(n_docs, n0 + group)
    col = tl.arange(0, GROUP)
    live_doc = col < n_end - n0
    _, len_all = _doc_span(span_ptr, n0 + col, live_doc, n_tokens, d_rows, DIM, PACKED, HAS_SPAN)
    n_chunks = tl.sum(tl.where(live_doc, tl.maximum(tl.cdiv(len_all, BLOCK_D), 1), 0), axis=0)
    n_chunks = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, n_chunks, 0)

    # (first element, tokens left) of the current document's next chunk
    n = n0
    first, length = _doc_span(span_ptr, n, n < n_end, n_tokens, d_rows, DIM, PACKED, HAS_SPAN)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    acc = tl.zeros([QPB_PAD, GROUP], tl.float32)
    if WINDOW:                                                  # [row, document of the window]: the row's max
        acc_rows = tl.zeros([BLOCK_Q, WINDOW], tl.float32)
        acc_windows = tl.zeros([QPB_PAD, GROUP // WINDOW, WINDOW], tl.float32)
    for _step in range(0, n_chunks):
        # past the document's end, rows repeat its last token (the max is unchanged), so no column
        # of S needs a mask; an empty document reads nothing and its maxima are set to -inf below
        token = tl.minimum(t_off, length - 1)
        mask = tl.zeros([BLOCK_D, 1], tl.int32) < length          # "any tokens": one test, in a shape tl.load takes
        if DIM < BLOCK_K:
            mask = mask & (k_off[None, :] < DIM)
        chunk = tl.load(d_ptr + first + (token[:, None] * DIM + k_off[None, :]), mask=mask, other=0.0)
        if UPCAST:
            sim = tl.dot(q.to(tl.float32), tl.trans(chunk.to(tl.float32)), input_precision="ieee")
        else:
            sim = tl.dot(q, tl.trans(chunk), input_precision=PRECISION)
        m = tl.maximum(m, tl.where(length > 0, tl.max(sim, axis=1), float("-inf")))
        last = length <= BLOCK_D
        if last:                                                # add up the document's rows per query
            if WINDOW:
                slot = (n - n0) % WINDOW
                acc_rows = tl.where(tl.arange(0, WINDOW)[None, :] == slot, m[:, None], acc_rows)
                if GROUP > WINDOW:
                    if slot == WINDOW - 1:                      # the window is full
                        acc_windows = _window_sums(acc_windows, acc_rows, (n - n0) // WINDOW, j, row_ok)
            else:
                per_query = tl.sum(tl.where(rows_of, m[:, None], 0.0), axis=0)
                acc = tl.where(col[None, :] == n - n0, acc + per_query[:, None], acc)
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        n += last.to(tl.int32)
        next_first, next_length = _doc_span(span_ptr, n, n < n_end, n_tokens, d_rows, DIM, PACKED, HAS_SPAN)
        first = tl.where(last, next_first, first + BLOCK_D * DIM)
        length = tl.where(last, next_length, length - BLOCK_D)

    # wanted from here on only, so made here (the live documents in another form than before the
    # loop, which the compiler would merge): values kept through the loop make ptxas spill
    jq = tl.arange(0, QPB_PAD)
    if WINDOW:                    # the last window (again, if full: sums replace, so that is harmless)
        last_window = tl.maximum(n_end - n0 - 1, 0) // WINDOW
        acc = tl.reshape(_window_sums(acc_windows, acc_rows, last_window, j, row_ok), [QPB_PAD, GROUP])
    query_q = qg * qpb + jq
    live_q = (jq < qpb) & (query_q < n_queries)
    live_doc = n0 + col < n_end
    if MEAN:                                                    # each split's share of the mean
        if HAS_Q_LEN:
            len_q = tl.minimum(tl.maximum(tl.load(q_len_ptr + query_q, mask=live_q, other=1).to(tl.int32), 1), q_tokens)
            acc = acc / len_q.to(tl.float32)[:, None]
        else:
            acc = acc / q_tokens

    if TOPK:                      # columns past the group rank as NaN, behind its documents
        key = ordered_key(tl.where(live_doc[None, :], acc, float("nan")))
        chosen = top_k_mask(key, k) & live_q[:, None]
        slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
        # each candidate key as its two int32 halves (little-endian): int64 arithmetic on the whole
        # tile took 135 registers a thread where two 8-warp programs per SM need 128 or fewer
        words = out_ptr.to(tl.pointer_type(tl.int32)) + 2 * (query_q.to(tl.int64)[:, None] * stride_on + dg * k + slot)
        tl.store(words, ~(n0 + col[None, :]), mask=chosen)
        tl.store(words + 1, key, mask=chosen)
    else:
        dst = split.to(tl.int64) * stride_os + query_q.to(tl.int64)[:, None] * stride_on + n0 + col[None, :]
        tl.store(out_ptr + dst, acc, mask=live_q[:, None] & live_doc[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A kernel build's blocking (its other constexprs follow the shape)."""
    block_q: int        # query-token rows per program (M of the dot)
    block_d: int        # document tokens per chunk (N of the dot)
    num_warps: int


@dataclass(frozen=True)
class Tiling:
    """The tunable part of a config, what a shipped JSON entry holds: the tile and its load
    stages (the documents per program follow the shape and the device)."""
    block_q: int
    block_d: int
    num_warps: int
    num_stages: int
    max_registers: int = 0      # a cap per thread (ptxas' maxnreg), so two programs share an SM; 0: none

    @property
    def tile(self) -> Tile:
        return Tile(self.block_q, self.block_d, self.num_warps)


@dataclass(frozen=True)
class MaxSimConfig:
    block_q: int        # as in Tile
    block_d: int
    group: int          # documents per program (a runtime value; GROUP is its compile-time bound)
    num_warps: int
    num_stages: int
    max_registers: int = 0      # as in Tiling


@dataclass(frozen=True)
class _Rows:
    """How the query tokens fill a row block."""
    lq_tile: int        # tokens of one query per block
    qpb: int            # queries per block
    n_qgroups: int
    n_splits: int       # blocks per query group

    @classmethod
    def of(cls, block_q: int, n_queries: int, q_tokens: int) -> "_Rows":
        lq_tile = min(q_tokens, block_q)
        qpb = min(MAX_QPB, block_q // lq_tile)
        return cls(lq_tile, qpb, triton.cdiv(n_queries, qpb), triton.cdiv(q_tokens, lq_tile))

    @property
    def qpb_pad(self) -> int:
        return pow2(self.qpb)

    @property
    def n_blocks(self) -> int:
        """Row blocks: query groups x the splits of each (one split unless Lq > BLOCK_Q)."""
        return self.n_qgroups * self.n_splits


def _family(dtype: torch.dtype, dim: int) -> tuple[int, list[Tile]]:
    """(the largest d of dim's tile family, the family's tiles, smallest first); shared memory and
    stages are sized for that largest d, so a tile builds alike for every d it serves.

    16-bit rows that are a multiple of 16 bytes (d % 8 == 0) run on tensor cores with tall query
    blocks (up to 256 rows), so each byte of D read from L2 feeds many rows; 64-token chunks (32
    when d > 128). Other d cannot be copied to shared memory in 16-byte pieces: the loads go
    through registers, so the tile stays small. float32 (FMA unless tf32 is allowed) keeps one
    32 x 32 tile, except where it takes the tensor cores (FP32_TENSOR_FAMILIES).
    """
    if dtype == torch.float32:
        return 256, [Tile(32, 32, 4)]
    if dim % 8:
        return 255, [Tile(32, 16, 4)]
    if dim <= 128:
        return 128, [Tile(32, 64, 2), Tile(64, 64, 4), Tile(128, 64, 8), Tile(256, 64, 8)]
    return 256, [Tile(32, 32, 2), Tile(64, 32, 4), Tile(128, 32, 8)]


def tile_shared(tile: Tile, stages: int, max_dim: int, dtype: torch.dtype) -> int:
    """Shared memory of a tile at a stage count (an upper estimate: the query tile, a chunk buffer
    per stage, the slack; the offline compile reads the real figure)."""
    return dtype.itemsize * pow2(max_dim, 16) * (tile.block_q + stages * tile.block_d) + SMEM_SLACK


def _stages(tile: Tile, max_dim: int, dtype: torch.dtype, smem_limit: int) -> int:
    """A third load stage where the query tile and three chunk buffers fit in shared memory."""
    return 3 if tile_shared(tile, 3, max_dim, dtype) <= smem_limit else 2


# float32 on the tensor cores: on the families listed, for d up to FP32_TENSOR_MAX_DIM, the dot takes
# _runtime.gemm_precision (tf32x3, or tf32 where torch allows it) at one of FP32_TENSOR_TILINGS (picked
# as the 16-bit tiles are, by padded rows); elsewhere the FMA units at the float32 family's 32 x 32
# tile. On the H100 (perf/maxsim_fp32.py), with the FMA dot the op was 2.1-3.3x slower than the einsum
# path. tf32x3 at 64 x 64 was the fastest of five tiles for one query (0.74 ms against einsum's 1.40),
# 128 x 64 at 8 warps for 16 queries (4.42 against 18.7) and ColPali (4.12 against 12.2). Under triton
# 3.6 and 3.9 the tf32x3 builds spill on sm_100 (tcgen05) and sm_120 (mma.sync), and at d = 256 on
# every target, so those keep the FMA units (perf/results/offline/maxsim_fp32_builds.txt).
FP32_TENSOR_FAMILIES = ("sm_90",)
FP32_TENSOR_MAX_DIM = 128
FP32_TENSOR_TILINGS = (Tiling(64, 64, 4, 3), Tiling(128, 64, 8, 2))


def fp32_tensor_cores(dtype: torch.dtype, dim: int, family: str) -> bool:
    return dtype == torch.float32 and dim <= FP32_TENSOR_MAX_DIM and family in FP32_TENSOR_FAMILIES


def fp32_tensor_tiling(n_queries: int, q_tokens: int) -> Tiling:
    tile = _pick_tile(n_queries, q_tokens, [tiling.tile for tiling in FP32_TENSOR_TILINGS])
    return next(tiling for tiling in FP32_TENSOR_TILINGS if tiling.tile == tile)


def dot_precision_for(dtype: torch.dtype, dim: int, device: torch.device) -> str:
    """The kernel's PRECISION: see FP32_TENSOR_FAMILIES."""
    if fp32_tensor_cores(dtype, dim, tuning.device_family(device)):
        return gemm_precision(dtype, device)
    return dot_precision(dtype)


# (target, tile) pairs whose top-k builds spill with per-window sums under triton 3.9 although
# the shape rule keeps the windows (perf/results/offline/maxsim_topk_window_spills.txt, session 8)
WINDOW_SPILLS = {(120, Tile(32, 64, 2)), (100, Tile(128, 32, 8))}


def doc_window(dtype: torch.dtype, tile: Tile, group_bound: int, cc: int) -> int:
    """The kernel's WINDOW on a target (the compute capability cc its family compiles for): documents
    whose row maxima wait in registers before their per-query sums. 0 (a sum per document) for
    float32, and on the top-k path (large groups) for tiles taller than 128 rows, tiles whose S
    tile alone takes 128 registers a thread, and WINDOW_SPILLS: ptxas spills the windows'
    registers there (under triton 3.9: sm_100 for 256 x 64 at 8 warps, sm_90 for 128 x 128 at 4
    warps: perf/results/offline/maxsim_topk_window_spills.txt; on the H200 the windows gain the
    tall top-k tiles under 1%, perf/results/NVIDIA_H200/maxsim_topk_ab.txt run 7)."""
    s_registers = tile.block_q * tile.block_d // (32 * tile.num_warps)
    spills = tile.block_q > 128 or s_registers >= 128 or (cc, tile) in WINDOW_SPILLS
    if dtype == torch.float32 or (group_bound > SCORE_GROUP and spills):
        return 0
    return min(group_bound, SCORE_GROUP)


def topk_group_bound(tile: Tile, qpb_pad: int) -> int:
    """GROUP on the top-k path: the documents whose scores a program holds for qpb_pad queries."""
    return min(MAX_TOPK_GROUP, TOPK_TILE_PER_THREAD * 32 * tile.num_warps // qpb_pad)


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory per block); the interpreter gets a few programs and no smem limit."""
    if device.type != "cuda":
        return 4, 1 << 30
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 101376)


def _pick_tile(n_queries: int, q_tokens: int, tiles: list[Tile]) -> Tile:
    """Fewest padded rows, weighted towards tall blocks (each block re-reads D from L2)."""
    def cost(tile):
        return _Rows.of(tile.block_q, n_queries, q_tokens).n_blocks * tile.block_q * (1 + 16 / tile.block_q)
    return min(tiles, key=cost)


def heuristic_tiling(n_queries: int, q_tokens: int, dim: int, dtype: torch.dtype, smem_limit: int) -> Tiling:
    """The built-in tiling (no timing): the family's tile with the fewest padded rows, and the
    stages that fit `smem_limit`."""
    max_dim, tiles = _family(dtype, dim)
    tile = _pick_tile(n_queries, q_tokens, tiles)
    return Tiling(tile.block_q, tile.block_d, tile.num_warps, _stages(tile, max_dim, dtype, smem_limit))


def choose_config(n_queries: int, q_tokens: int, n_docs: int, dim: int, dtype: torch.dtype,
                  sms: int, smem_limit: int, k: Optional[int] = None, tiling: Optional[Tiling] = None) -> MaxSimConfig:
    """Block sizes from the shape and the device: `tiling` (a tuned entry), else the heuristic's,
    and the documents per program; `k` asks for the top-k path's large groups."""
    tiling = tiling or heuristic_tiling(n_queries, q_tokens, dim, dtype, smem_limit)
    tile = tiling.tile
    rows = _Rows.of(tile.block_q, n_queries, q_tokens)
    work = n_docs * rows.n_blocks                  # (document, row block) pairs
    if k is None:           # ~8 programs per SM
        group = max(1, min(SCORE_GROUP, work // (8 * sms)))
    else:                   # up to as many documents as the score tile holds, in whole rounds of
        # two programs per SM: at Nd=1M a program is ~1/15 of the call, so a last round that left
        # SMs idle would cost up to that (the gain was not timed apart)
        bound, slots = topk_group_bound(tile, rows.qpb_pad), 2 * sms
        groups = triton.cdiv(work, bound * slots) * slots // rows.n_blocks
        group = max(16, min(bound, triton.cdiv(n_docs, max(1, groups))))
    return MaxSimConfig(tile.block_q, tile.block_d, group, tile.num_warps, tiling.num_stages, tiling.max_registers)


def tuning_bucket(n_queries: int, q_tokens: int, dim: int, dtype: torch.dtype) -> str:
    """The key tuned tilings are stored under: the tile family (16-bit by its largest d, or
    float32) and the call's query rows rounded up to a power of two."""
    kind = "fp32" if dtype == torch.float32 else f"d{_family(dtype, dim)[0]}"
    return f"{kind}_rows{pow2(n_queries * q_tokens)}"


def tiling_from_json(entry: dict) -> Tiling:
    return Tiling(**entry)


def tiling_to_json(tiling: Tiling) -> dict:
    """The entry, without a register cap where there is none."""
    return {name: value for name, value in asdict(tiling).items() if name != "max_registers" or value}


def pick_config(n_queries: int, q_tokens: int, n_docs: int, dim: int, dtype: torch.dtype,
                device: torch.device, k: Optional[int] = None) -> MaxSimConfig:
    """The shipped tiling of the shape's bucket for this device, else the heuristic's. The top-k
    path has entries of its own ("maxsim_topk": its large groups change which tile is fastest;
    a file without one gives the scoring path's, see tuning.ENTRY_FALLBACK)."""
    kernel = "maxsim" if k is None else "maxsim_topk"
    tiling = tuning.tuned_config(kernel, tuning_bucket(n_queries, q_tokens, dim, dtype), tiling_from_json)
    if tiling is None and fp32_tensor_cores(dtype, dim, tuning.device_family(device)):
        tiling = fp32_tensor_tiling(n_queries, q_tokens)
    return choose_config(n_queries, q_tokens, n_docs, dim, dtype, *_device_limits(device), k, tiling)


def _token_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, its batch stride in rows): t's tokens as rows of d contiguous elements, consecutive
    within a batch, batches a whole number of rows apart. Copies only a tensor that is not."""
    d = t.shape[-1]
    unit = (d <= 1 or t.stride(-1) == 1) and (t.shape[-2] <= 1 or t.stride(-2) == d)
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) % d:
        unit = False
    if not unit:
        t = t.contiguous()
    return t, (t.stride(0) // d if t.dim() == 3 and t.shape[0] > 1 else 0)


def _launch(Q, D, spans, packed, q_lengths, reduction, k, config, checks=None):
    """Scores [Nq, Nd] (k None) or top-k candidates ([Nq, groups * k] int64 keys, decode_keys).

    D is [Nd, Ld, d] (spans = d_lengths or None) or packed [T, d] (spans = doc_offsets).
    `checks` (deferred value checks of the arguments) are verified just before the launch.
    A query longer than BLOCK_Q is scored in splits, one row block each, whose partial sums
    [n_splits, Nq, Nd] add up in a fixed order (the top-k path takes unsplit queries only).
    A repeated eager call without a given config launches the compiled kernel its first call kept
    (launch_plans.py), skipping the config choice and Triton's argument binding.
    """
    n_queries, q_tokens, dim = Q.shape
    n_docs = spans.shape[0] - 1 if packed else D.shape[0]
    pointers = key = None
    if n_queries and n_docs:
        Q, q_rows = _token_rows(Q)
        D, d_rows = _token_rows(D)
        spans = None if spans is None else spans.contiguous()
        q_lengths = None if q_lengths is None else q_lengths.contiguous()
        # absent spans or lengths take Q's pointer (never read); a D without elements (every
        # document empty) may have a null pointer: its loads are all masked
        pointers = (Q, D if D.numel() else Q, Q if spans is None else spans, Q if q_lengths is None else q_lengths)
        if config is None and plans_apply(Q.device):
            key = _plan_key(D, pointers, spans is not None, q_lengths is not None, packed, reduction, k)
            plan = _PLANS.find(key, ())
            if plan is not None:
                out_shape, out_dtype, n_splits = plan.extra
                out = torch.empty(out_shape, dtype=out_dtype, device=Q.device)
                if checks is not None:
                    checks.verify()
                plan.launch(*pointers, out)
                return _scores_or_keys(out, k, n_splits)
    cfg = config or pick_config(n_queries, q_tokens, n_docs, dim, Q.dtype, Q.device, k)
    rows = _Rows.of(cfg.block_q, n_queries, q_tokens)
    tile = Tile(cfg.block_q, cfg.block_d, cfg.num_warps)
    group_bound = SCORE_GROUP if k is None else topk_group_bound(tile, rows.qpb_pad)
    assert cfg.group <= group_bound and (k is None or rows.n_splits == 1), (cfg, k)
    n_groups = triton.cdiv(n_docs, cfg.group)
    if k is None:
        out = torch.empty((rows.n_splits, n_queries, n_docs), dtype=torch.float32, device=Q.device)
        stride_on = n_docs
    else:
        out = torch.empty((n_queries, n_groups * k), dtype=torch.int64, device=Q.device)
        stride_on = n_groups * k
    if pointers is not None:
        args = (*pointers, out,
                n_queries, n_docs, q_tokens, D.shape[0] if packed else D.shape[1], rows.lq_tile, rows.qpb,
                rows.n_splits, cfg.group, k or 0, q_rows, d_rows, n_queries * n_docs, stride_on)
        kwargs = dict(
            DIM=dim, PACKED=packed, HAS_SPAN=spans is not None, HAS_Q_LEN=q_lengths is not None,
            MEAN=reduction == "mean", TOPK=k is not None, BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d,
            BLOCK_K=pow2(dim, 16), QPB_PAD=rows.qpb_pad, GROUP=group_bound,
            UPCAST=dot_upcast(Q), PRECISION=dot_precision_for(Q.dtype, dim, Q.device),
            WINDOW=doc_window(Q.dtype, tile, group_bound, tuning.FAMILY_CC[tuning.device_family(Q.device)]),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers or None)
        grid = (n_groups * rows.n_blocks,)
    if checks is not None:
        checks.verify()     # as late as this: the host work above overlapped the device's catching up
    if pointers is not None:
        compiled = maxsim_kernel[grid](*args, **kwargs, enable_fp_fusion=FP_FUSION)
        if key is not None:
            _PLANS.record(key, (), compiled, grid, args, kwargs, slots=PLAN_SLOTS,
                          extra=(out.shape, out.dtype, rows.n_splits))
    return _scores_or_keys(out, k, rows.n_splits)


# eager launches of maxsim_kernel at a repeated call (launch_plans.py); the per-call tensors
PLAN_SLOTS = ("q_ptr", "d_ptr", "span_ptr", "q_len_ptr", "out_ptr")
_PLANS = LaunchPlans(maxsim_kernel)


def _plan_key(D, pointers, has_span, has_q_len, packed, reduction, k) -> tuple:
    """Everything a launch derives its config and Triton its specialization from: the current
    device (the config's and the launch's), the tensors' device and stream, the tuning state, the
    flags, the shapes, strides and dtypes of Q, D and the spans and lengths (every integer argument
    follows from them; D's own, as an empty D passes Q's pointer) and the pointers' 16-byte alignment."""
    Q, _, span, q_len = pointers
    return (torch.cuda.current_device(), Q.device.index, current_stream(Q.device), tuning.generation(), has_span,
            has_q_len, packed, reduction, k, Q.dtype, tuple(Q.shape),
            Q.stride(), tuple(D.shape), D.stride(), tuple(span.shape), span.dtype, q_len.dtype,
            *(t.data_ptr() % 16 for t in pointers))


def _scores_or_keys(out, k, n_splits):
    if k is not None:
        return out
    return out[0] if n_splits == 1 else out.sum(0)


def launch_maxsim(Q, D, q_lengths=None, d_lengths=None, reduction="sum", config=None, checks=None) -> torch.Tensor:
    return _launch(Q, D, d_lengths, False, q_lengths, reduction, None, config, checks)


def launch_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths=None, reduction="sum", config=None,
                         checks=None) -> torch.Tensor:
    return _launch(Q, D_packed, doc_offsets, True, q_lengths, reduction, None, config, checks)


def launch_maxsim_topk(Q, D, k, q_lengths=None, d_lengths=None, reduction="sum", config=None, checks=None):
    """Per-group top-k candidates in the kernel, then the final k; all scores only when k is
    too large for a group to shrink the candidates, or a query is longer than BLOCK_Q."""
    cfg = config or pick_config(Q.shape[0], Q.shape[1], D.shape[0], D.shape[2], Q.dtype, Q.device, k)
    if 2 * k > cfg.group or Q.shape[1] > cfg.block_q:
        return reference.ranked_topk(_launch(Q, D, d_lengths, False, q_lengths, reduction, None, config, checks), k)
    # keys are unique (one per document) and ordered as the ranking is, so torch.topk's choice
    # among them is exact. Slots past the end of a short last group hold NaN keys of documents
    # past Nd, behind every real candidate, and are never reached as k <= Nd.
    keys = _launch(Q, D, d_lengths, False, q_lengths, reduction, k, config, checks)
    return decode_keys(torch.topk(keys, k, dim=1).values)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, document indices int64) of the kernel's candidate keys: int64 keys in the
    order of maxsim_topk's ranking, the score's order-preserving int32 key (topk.ordered_key: NaN
    below every number) above the document index, inverted, so a larger key is a higher score and,
    among equal scores, a lower document. Unique per document, so any top-k of them is exact. The
    score half is topk.key_value's inverse map, on the host."""
    high = (keys >> 32).to(torch.int32)
    bits = torch.where(high >= 0, high, high ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(high == NAN_KEY.value, float("nan"))
    return scores, DOC_MASK - (keys & DOC_MASK)


# one (dtype, d) per tile family: its largest d, which the offline check builds each tile at
FAMILY_DIMS = ((torch.bfloat16, 128), (torch.bfloat16, 256), (torch.bfloat16, 255), (torch.float32, 256))


def bucket_family(bucket: str) -> tuple[torch.dtype, int]:
    """(dtype, largest d) of a tuning bucket's tile family (bf16 stands for both 16-bit types)."""
    kind = bucket.split("_")[0]
    return (torch.float32, 256) if kind == "fp32" else (torch.bfloat16, int(kind[1:]))


def shipped_tilings() -> dict:
    """{(dtype, largest d, tiling): compile targets} of every tiling a launcher can choose: each
    family's tiles at the stages each target's shared memory gives, float32's tensor-core tiling on
    its families, and every shipped JSON entry (scoring and top-k paths) for the targets of its
    file's family."""
    from .offline import SHARED_LIMIT
    found = {}
    picks = [((dtype, dim, Tiling(t.block_q, t.block_d, t.num_warps, _stages(t, dim, dtype, smem))), (cc,))
             for dtype, dim in FAMILY_DIMS for t in _family(dtype, dim)[1] for cc, smem in SHARED_LIMIT.items()]
    picks += [((torch.float32, FP32_TENSOR_MAX_DIM, tiling), tuple(tuning.FAMILY_CC[f] for f in FP32_TENSOR_FAMILIES))
              for tiling in FP32_TENSOR_TILINGS]
    picks += [((*bucket_family(bucket), tiling_from_json(entry)), targets)
              for kernel in ("maxsim", "maxsim_topk") for targets, _, bucket, entry in tuning.shipped_buckets(kernel)]
    for key, targets in picks:
        found[key] = tuple(sorted(set(found.get(key, ())) | set(targets)))
    return found


def offline_builds():
    """Every tiling the launcher can choose (shipped_tilings), on both paths (scores, top-k), with
    one query per block (Lq > BLOCK_Q / 2, or a split query) and with MAX_QPB. d is the largest the
    tile serves, and the top-k path has its largest group and k; float32 runs with one tf32 product
    and without (tf32x3 at its tensor-core tiling, else FMA). bf16 stands for both 16-bit types."""
    from .offline import KernelBuild, dtype_name
    builds = []
    for (dtype, dim, tiling), targets in shipped_tilings().items():
        dt = dtype_name(dtype)
        types = {"q_ptr": f"*{dt}", "d_ptr": f"*{dt}", "span_ptr": "*i64", "q_len_ptr": "*i32"}
        types.update({a: "i32" for a in ("n_queries", "n_docs", "q_tokens", "n_tokens", "lq_tile", "qpb", "n_splits",
                                          "group", "k", "q_rows", "d_rows", "stride_os", "stride_on")})
        tile = tiling.tile
        tensor = dtype == torch.float32 and dim == FP32_TENSOR_MAX_DIM and tiling in FP32_TENSOR_TILINGS
        precisions = ("tf32x3", "tf32") if tensor else ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for qpb_pad, topk, precision in itertools.product(
                sorted({1, pow2(min(MAX_QPB, tile.block_q))}), (False, True), precisions):
            group = topk_group_bound(tile, qpb_pad) if topk else SCORE_GROUP
            windows = {}                                        # WINDOW -> the targets that build with it
            for cc in targets:
                windows.setdefault(doc_window(dtype, tile, group, cc), []).append(cc)
            for window, window_targets in windows.items():
                constexprs = dict(DIM=dim, PACKED=not topk, HAS_SPAN=True, HAS_Q_LEN=True, MEAN=False, TOPK=topk,
                                  BLOCK_Q=tile.block_q, BLOCK_D=tile.block_d, BLOCK_K=pow2(dim, 16), QPB_PAD=qpb_pad,
                                  GROUP=group, UPCAST=False, PRECISION=precision,
                                  WINDOW=window)
                # wgmma / tcgen05 take tiles of 64 rows or more; smaller tiles use mma.sync, and
                # float32 off the tensor cores FMA, which the offline check does not ask of a dot
                builds.append(KernelBuild(
                    f"maxsim_{dt}_d{dim}_{'topk' if topk else 'scores'}_q{qpb_pad}_BQ{tile.block_q}"
                    f"_BD{tile.block_d}_w{tile.num_warps}_s{tiling.num_stages}"
                    f"{'' if precision == 'ieee' else '_' + precision}"
                    f"{f'_r{tiling.max_registers}' if tiling.max_registers else ''}",
                    maxsim_kernel, {**types, "out_ptr": "*i64" if topk else "*fp32"}, constexprs,
                    num_warps=tile.num_warps, num_stages=tiling.num_stages, max_registers=tiling.max_registers,
                    targets=tuple(window_targets),
                    uses_dot=tile.block_q >= 64 and (dtype != torch.float32 or tensor)))
    return builds


# ---------------------------------------------------------------------------------------------
# Custom ops and the public API
# ---------------------------------------------------------------------------------------------
def _kernel_ok(Q: torch.Tensor) -> bool:
    """float64 (the tests' oracle precision) stays on the reference."""
    return use_triton(Q) and Q.dtype in TL_DTYPE


def _call(checks, launch, op, *args):
    """op(*args) with its deferred value checks verified before its kernel runs: by the launcher,
    just before the launch, where the call may skip the dispatcher (skips_dispatcher); else first,
    then through the registered op."""
    if skips_dispatcher(*(a for a in args if a is None or isinstance(a, torch.Tensor))) and _kernel_ok(args[0]):
        return launch(*args, checks=checks)
    checks.verify()
    return op(*args)


def _maxsim(Q: torch.Tensor, D: torch.Tensor, q_lengths: Optional[torch.Tensor],
               d_lengths: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if _kernel_ok(Q):
        return launch_maxsim(Q, D, q_lengths, d_lengths, reduction)
    return reference._maxsim(Q, D, q_lengths, d_lengths, reduction).to(torch.float32)


_maxsim_op = torch.library.custom_op("fused_ops::maxsim", mutates_args=())(_maxsim)


@_maxsim_op.register_fake
def _(Q, D, q_lengths, d_lengths, reduction):
    return Q.new_empty((Q.shape[0], D.shape[0]), dtype=torch.float32)


def _maxsim_varlen(Q: torch.Tensor, D_packed: torch.Tensor, doc_offsets: torch.Tensor,
                      q_lengths: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if _kernel_ok(Q):
        return launch_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction)
    D, lengths = reference.unpack_documents(D_packed, doc_offsets)
    return reference._maxsim(Q, D, q_lengths, lengths, reduction).to(torch.float32)


_maxsim_varlen_op = torch.library.custom_op("fused_ops::maxsim_varlen", mutates_args=())(_maxsim_varlen)


@_maxsim_varlen_op.register_fake
def _(Q, D_packed, doc_offsets, q_lengths, reduction):
    return Q.new_empty((Q.shape[0], doc_offsets.shape[0] - 1), dtype=torch.float32)


def _maxsim_topk(Q: torch.Tensor, D: torch.Tensor, k: int, q_lengths: Optional[torch.Tensor],
                    d_lengths: Optional[torch.Tensor], reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_ok(Q):
        return launch_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction)
    scores = reference._maxsim(Q, D, q_lengths, d_lengths, reduction).to(torch.float32)
    return reference.ranked_topk(scores, k)


_maxsim_topk_op = torch.library.custom_op("fused_ops::maxsim_topk", mutates_args=())(_maxsim_topk)


@_maxsim_topk_op.register_fake
def _(Q, D, k, q_lengths, d_lengths, reduction):
    shape = (Q.shape[0], k)
    return Q.new_empty(shape, dtype=torch.float32), Q.new_empty(shape, dtype=torch.int64)


def maxsim(Q: torch.Tensor, D: torch.Tensor, *, q_lengths: Optional[torch.Tensor] = None,
           d_lengths: Optional[torch.Tensor] = None, reduction: str = "sum") -> torch.Tensor:
    """float32 scores [Nq, Nd] of queries Q [Nq, Lq, d] against padded documents D [Nd, Ld, d]."""
    checks = reference.check_maxsim(Q, D, q_lengths, d_lengths, reduction, defer=True)
    return _call(checks, launch_maxsim, _maxsim_op, Q, D, q_lengths, d_lengths, reduction)


def maxsim_varlen(Q: torch.Tensor, D_packed: torch.Tensor, doc_offsets: torch.Tensor, *,
                  q_lengths: Optional[torch.Tensor] = None, reduction: str = "sum") -> torch.Tensor:
    """float32 scores [Nq, Nd] against documents packed end to end in D_packed [T, d]."""
    checks = reference.check_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction, defer=True)
    return _call(checks, launch_maxsim_varlen, _maxsim_varlen_op, Q, D_packed, doc_offsets, q_lengths, reduction)


def maxsim_topk(Q: torch.Tensor, D: torch.Tensor, k: int, *, q_lengths: Optional[torch.Tensor] = None,
                d_lengths: Optional[torch.Tensor] = None, reduction: str = "sum"):
    """(scores float32 [Nq, k], indices int64 [Nq, k]): each query's k best documents, descending."""
    checks = reference.check_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction, defer=True)
    return _call(checks, launch_maxsim_topk, _maxsim_topk_op, Q, D, k, q_lengths, d_lengths, reduction)
