"""MaxSim (late interaction): padded, packed and top-k scoring with one Triton kernel.

scores[q, n] = sum_{i < q_len[q]} max_{j < len[n]} <Q[q, i], D[n, j]>   (divided by q_len for "mean")

How the work is laid out
- Rows (the M dim of the dot): the query tokens of the whole call are flattened. A row block of
  BLOCK_Q rows holds `qpb` whole queries when Lq <= BLOCK_Q (row r -> query r // Lq), or one
  BLOCK_Q-token slice ("split") of one query when Lq > BLOCK_Q; a program loops over a query's
  splits itself, so each score is finished in one program (no partial buffers, deterministic).
- Documents: a program takes a group of GROUP consecutive documents. A document is a start row and
  a real length (padded: n * D.stride(0) and d_lengths[n]; packed: doc_offsets[n] and
  offsets[n + 1] - offsets[n]), so both layouts share the kernel. Only real tokens are read, in
  BLOCK_D chunks; the chunks of a program's documents form one flat loop, so the load pipeline
  runs across document boundaries. S = Q_rows @ chunk^T stays on chip (fp32 accumulation, bf16/fp16
  operands as they are); columns past the length become -inf before the running row max, and
  rows of absent query tokens add 0 to the per-query sums (never -inf * 0).
- Grid: document groups x query groups, query groups fastest, so the programs that read one
  document group run side by side and D comes from HBM about once per call (repeats hit L2).
- maxsim_topk: GROUP grows to hundreds of documents; a program keeps its group's scores in
  registers and writes only their top k per query (ties to the lower index, NaN last); a
  ranked_topk over the [Nq, groups * k] candidates picks the final k. The [Nq, Nd] scores are
  never written.
- Lengths and offsets are clamped to the tensor they index, so bad values (unchecked during
  CUDA-graph capture) can give wrong scores but never read out of bounds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import TL_DTYPE, dot_upcast, pow2, use_triton
from .topk import topk_tile

MAX_TILE_ELEMS = 256 * 128        # BLOCK_Q * BLOCK_K of the query tile (64 KB in bf16)
MAX_SCORE_TILE = 4096             # QPB_PAD * GROUP: the register tile of one program's scores
MAX_TOPK_GROUP = 1024             # documents per program on the top-k path
SMEM_SLACK = 4096                 # shared memory Triton needs besides the tiles (reduction scratch)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _doc_span(span_ptr, n, live, n_tokens, stride_dn, stride_dt, PACKED: tl.constexpr, HAS_SPAN: tl.constexpr):
    """(offset of the first element, real length) of document(s) n, clamped to the tensor; 0 where not live."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(span_ptr + n, mask=live, other=0).to(tl.int64), 0), n_tokens)
        end = tl.minimum(tl.maximum(tl.load(span_ptr + n + 1, mask=live, other=0).to(tl.int64), start), n_tokens)
        first = start * stride_dt
        length = (end - start).to(tl.int32)
    else:
        first = n.to(tl.int64) * stride_dn
        if HAS_SPAN:
            length = tl.minimum(tl.maximum(tl.load(span_ptr + n, mask=live, other=0).to(tl.int32), 0), n_tokens)
        else:
            length = tl.where(live, n_tokens, 0)
    return first, length


@triton.jit
def maxsim_kernel(q_ptr, d_ptr, span_ptr, q_len_ptr, out_ptr, idx_ptr,
                  n_queries, n_docs, q_tokens, n_tokens, lq_tile, qpb, k,
                  stride_qn, stride_ql, stride_dn, stride_dt, stride_on,
                  DIM: tl.constexpr, PACKED: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_Q_LEN: tl.constexpr,
                  MEAN: tl.constexpr, TOPK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_K: tl.constexpr, QPB_PAD: tl.constexpr, GROUP: tl.constexpr, K_PAD: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program: GROUP documents x one query group (qpb queries, all their splits).

    n_tokens: the padded length Ld, or the row count T of the packed layout.
    The chunks of all GROUP documents form one flat loop; the (document, offset) of the next chunk
    does not depend on the dot, so the loads of later chunks are in flight while this one is scored.
    An empty document takes one fully masked chunk, which leaves its row maxima at -inf.
    TOPK: write the group's top k per query to (out, idx) [Nq, groups * k] instead of all scores.
    """
    n_qgroups = tl.cdiv(n_queries, qpb)
    qg = tl.program_id(0) % n_qgroups
    dg = tl.program_id(0) // n_qgroups
    k_off = tl.arange(0, BLOCK_K)
    t_off = tl.arange(0, BLOCK_D)

    # the queries of this group: one lane each
    jq = tl.arange(0, QPB_PAD)
    query_q = qg * qpb + jq
    live_q = (jq < qpb) & (query_q < n_queries)
    if HAS_Q_LEN:
        len_q = tl.minimum(tl.maximum(tl.load(q_len_ptr + query_q, mask=live_q, other=0).to(tl.int32), 0), q_tokens)
    else:
        len_q = tl.where(live_q, q_tokens, 0)
    n_splits = tl.cdiv(tl.max(len_q, axis=0), lq_tile)

    # the rows: row r is token (split * lq_tile + r % lq_tile) of local query r // lq_tile
    r = tl.arange(0, BLOCK_Q)
    j = r // lq_tile
    query_r = qg * qpb + j
    live_r = (j < qpb) & (query_r < n_queries)
    if HAS_Q_LEN:
        len_r = tl.minimum(tl.maximum(tl.load(q_len_ptr + query_r, mask=live_r, other=0).to(tl.int32), 0), q_tokens)
    else:
        len_r = tl.where(live_r, q_tokens, 0)
    row_ptr = q_ptr + query_r.to(tl.int64) * stride_qn
    owner = j[:, None] == jq[None, :]                       # [BLOCK_Q, QPB_PAD]: row r belongs to query j

    # the documents of this group, and their chunk count
    n0 = dg * GROUP
    n_end = tl.minimum(n_docs, n0 + GROUP)
    col = tl.arange(0, GROUP)
    live_doc = n0 + col < n_end
    _, len_all = _doc_span(span_ptr, n0 + col, live_doc, n_tokens, stride_dn, stride_dt, PACKED, HAS_SPAN)
    n_chunks = tl.sum(tl.where(live_doc, tl.maximum(tl.cdiv(len_all, BLOCK_D), 1), 0), axis=0)

    acc = tl.zeros([QPB_PAD, GROUP], tl.float32)
    for split in range(0, n_splits):
        tok_q = split * lq_tile + (r - j * lq_tile)
        row_ok = tok_q < len_r
        q = tl.load(row_ptr[:, None] + tok_q[:, None] * stride_ql + k_off[None, :],
                    mask=row_ok[:, None] & (k_off[None, :] < DIM), other=0.0)
        n = n0
        c0 = 0
        first, length = _doc_span(span_ptr, n, n < n_end, n_tokens, stride_dn, stride_dt, PACKED, HAS_SPAN)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        for _step in range(0, n_chunks):
            tok = c0 + t_off
            chunk = tl.load(d_ptr + first + tok.to(tl.int64)[:, None] * stride_dt + k_off[None, :],
                            mask=(tok[:, None] < length) & (k_off[None, :] < DIM), other=0.0)
            if UPCAST:
                sim = tl.dot(q.to(tl.float32), tl.trans(chunk.to(tl.float32)), input_precision="ieee")
            else:
                sim = tl.dot(q, tl.trans(chunk), input_precision=PRECISION)
            if c0 + BLOCK_D <= length:                       # a full chunk needs no mask
                m = tl.maximum(m, tl.max(sim, axis=1))
            else:
                m = tl.maximum(m, tl.max(tl.where(tok[None, :] < length, sim, float("-inf")), axis=1))
            last = c0 + BLOCK_D >= length
            if last:                                         # add up the document's rows per query
                per_query = tl.sum(tl.where(owner & row_ok[:, None], m[:, None], 0.0), axis=0)
                acc = tl.where(col[None, :] == n - n0, acc + per_query[:, None], acc)
                m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
            n += last.to(tl.int32)
            c0 = tl.where(last, 0, c0 + BLOCK_D)
            first, length = _doc_span(span_ptr, n, n < n_end, n_tokens, stride_dn, stride_dt, PACKED, HAS_SPAN)
    if MEAN:
        acc = acc / tl.maximum(len_q, 1).to(tl.float32)[:, None]

    if TOPK:
        values, local = topk_tile(acc, col[None, :], live_doc[None, :], k, K_PAD)
        slot = tl.arange(0, K_PAD)[None, :]
        dst = query_q.to(tl.int64)[:, None] * stride_on + dg * k + slot
        ok = live_q[:, None] & (slot < k)
        tl.store(out_ptr + dst, values, mask=ok)
        tl.store(idx_ptr + dst, n0 + local.to(tl.int64), mask=ok)
    else:
        dst = query_q.to(tl.int64)[:, None] * stride_on + n0 + col[None, :]
        tl.store(out_ptr + dst, acc, mask=live_q[:, None] & live_doc[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaxSimConfig:
    block_q: int        # query-token rows per program (M of the dot)
    block_d: int        # document tokens per chunk (N of the dot)
    group: int          # documents per program
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _Rows:
    """How the query tokens fill a row block."""
    lq_tile: int        # tokens of one query per block
    qpb: int            # queries per block
    n_qgroups: int

    @classmethod
    def of(cls, block_q: int, n_queries: int, q_tokens: int) -> "_Rows":
        lq_tile = min(q_tokens, block_q)
        qpb = block_q // lq_tile
        return cls(lq_tile, qpb, triton.cdiv(n_queries, qpb))

    @property
    def qpb_pad(self) -> int:
        return pow2(self.qpb)


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory per block); the interpreter gets a few programs and no smem limit."""
    if device.type != "cuda":
        return 4, 1 << 30
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 101376)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _pick_block_q(n_queries: int, q_tokens: int, sizes) -> int:
    """Fewest padded rows, weighted towards tall blocks (each block re-reads D from L2)."""
    def cost(bq):
        rows = _Rows.of(bq, n_queries, q_tokens)
        return rows.n_qgroups * triton.cdiv(q_tokens, rows.lq_tile) * bq * (1 + 16 / bq)
    return min(sizes, key=cost)


def choose_config(n_queries: int, q_tokens: int, n_docs: int, dim: int, dtype: torch.dtype,
                  sms: int, smem_limit: int, k: Optional[int] = None) -> MaxSimConfig:
    """Block sizes from the shape and the device; `k` asks for the top-k path's large groups.

    16-bit inputs run on tensor cores with tall query blocks (up to 256 rows), so each byte of D
    read from L2 feeds many rows. float32 (FMA unless tf32 is allowed) keeps 32-row tiles, which
    do not spill. A third load stage is used where the shared memory of the device allows it.
    """
    block_k = pow2(dim, 16)
    wide = dtype == torch.float32
    sizes = [bq for bq in ((32, 16) if wide else (256, 128, 64, 32, 16)) if bq * block_k <= MAX_TILE_ELEMS]
    block_q = _pick_block_q(n_queries, q_tokens, sizes)
    rows = _Rows.of(block_q, n_queries, q_tokens)
    block_d = 32 if wide or block_k > 128 else 64
    work = n_docs * rows.n_qgroups                 # (document, query group) pairs
    cap = MAX_SCORE_TILE // rows.qpb_pad
    if k is None:           # ~8 programs per SM, at most 16 documents each
        group = min(16, cap, _pow2_floor(work // (8 * sms)))
    else:                   # ~2 programs per SM, as many documents as the score tile holds
        group = max(16, min(MAX_TOPK_GROUP, cap, _pow2_floor(work // (2 * sms))))
    tiles = (4 if wide else 2) * block_k * (block_q + 3 * block_d)      # the query tile + 3 chunk buffers
    # fewest warps that hold the tiles without spilling (offline_builds checks them)
    warps = 8 if block_q >= 128 else 4 if block_q == 64 or wide else 2
    return MaxSimConfig(block_q=block_q, block_d=block_d, group=group, num_warps=warps,
                        num_stages=3 if tiles <= smem_limit - SMEM_SLACK else 2)


def pick_config(n_queries: int, q_tokens: int, n_docs: int, dim: int, dtype: torch.dtype,
                device: torch.device, k: Optional[int] = None) -> MaxSimConfig:
    return choose_config(n_queries, q_tokens, n_docs, dim, dtype, *_device_limits(device), k)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _precision(t: torch.Tensor) -> str:
    return "tf32" if t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(Q, D, spans, packed, q_lengths, reduction, k, config):
    """Scores [Nq, Nd] (k None) or top-k candidates ([Nq, groups * k] values, indices).

    D is [Nd, Ld, d] (spans = d_lengths or None) or packed [T, d] (spans = doc_offsets).
    """
    Q = _unit_last(Q)
    D = _unit_last(D)
    n_queries, q_tokens, dim = Q.shape
    n_docs = spans.shape[0] - 1 if packed else D.shape[0]
    cfg = config or pick_config(n_queries, q_tokens, n_docs, dim, Q.dtype, Q.device, k)
    rows = _Rows.of(cfg.block_q, n_queries, q_tokens)
    n_groups = triton.cdiv(n_docs, cfg.group)
    if k is None:
        out = torch.empty((n_queries, n_docs), dtype=torch.float32, device=Q.device)
        idx = out
        stride_on = n_docs
    else:
        out = torch.empty((n_queries, n_groups * k), dtype=torch.float32, device=Q.device)
        idx = torch.empty((n_queries, n_groups * k), dtype=torch.int64, device=Q.device)
        stride_on = n_groups * k
    if n_queries == 0 or n_docs == 0:
        return out if k is None else (out, idx)
    if packed:
        n_tokens, stride_dn, stride_dt = D.shape[0], 0, D.stride(0)
    else:
        n_tokens, stride_dn, stride_dt = D.shape[1], D.stride(0), D.stride(1)
    span_ptr = Q if spans is None else spans.contiguous()
    q_len_ptr = Q if q_lengths is None else q_lengths.contiguous()
    # a D without elements (every document empty) may have a null pointer; its loads are all masked
    d_ptr = D if D.numel() else Q
    maxsim_kernel[(n_groups * rows.n_qgroups,)](
        Q, d_ptr, span_ptr, q_len_ptr, out, idx,
        n_queries, n_docs, q_tokens, n_tokens, rows.lq_tile, rows.qpb, k or 0,
        Q.stride(0), Q.stride(1), stride_dn, stride_dt, stride_on,
        DIM=dim, PACKED=packed, HAS_SPAN=spans is not None, HAS_Q_LEN=q_lengths is not None,
        MEAN=reduction == "mean", TOPK=k is not None, BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d,
        BLOCK_K=pow2(dim, 16), QPB_PAD=rows.qpb_pad, GROUP=cfg.group,
        K_PAD=pow2(k or 1), UPCAST=dot_upcast(Q), PRECISION=_precision(Q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if k is None else (out, idx)


def launch_maxsim(Q, D, q_lengths=None, d_lengths=None, reduction="sum", config=None) -> torch.Tensor:
    return _launch(Q, D, d_lengths, False, q_lengths, reduction, None, config)


def launch_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths=None, reduction="sum", config=None) -> torch.Tensor:
    return _launch(Q, D_packed, doc_offsets, True, q_lengths, reduction, None, config)


def launch_maxsim_topk(Q, D, k, q_lengths=None, d_lengths=None, reduction="sum", config=None):
    """Per-group top-k candidates in the kernel, then the final k; all scores only when k is
    too large for a group to shrink the candidates."""
    cfg = config or pick_config(Q.shape[0], Q.shape[1], D.shape[0], D.shape[2], Q.dtype, Q.device, k)
    if 2 * k > cfg.group:
        return reference.ranked_topk(_launch(Q, D, d_lengths, False, q_lengths, reduction, None, config), k)
    # equal candidates sit in document order (groups ascend and topk_tile breaks ties to the lower
    # index), so ranked_topk's stable ties still pick the lower document. Slots past the end of a
    # short last group hold NaN behind every real candidate and are never reached, as k <= Nd.
    cand, cand_idx = _launch(Q, D, d_lengths, False, q_lengths, reduction, k, cfg)
    values, pos = reference.ranked_topk(cand, k)
    return values, cand_idx.gather(1, pos)


# shapes whose configs the offline compile check builds: (name, Nq, Lq, Nd, d, dtype, k, packed)
OFFLINE_SHAPES = (
    ("colbert", 1, 32, 100_000, 128, torch.bfloat16, None, False),
    ("rerank16", 16, 32, 10_000, 128, torch.bfloat16, None, False),
    ("rerank16_packed", 16, 32, 10_000, 128, torch.float16, None, True),
    ("colpali", 1, 1024, 1000, 128, torch.bfloat16, None, False),
    ("topk", 16, 32, 1_000_000, 128, torch.bfloat16, 100, False),
    ("wide", 4, 32, 10_000, 256, torch.float16, None, False),
    ("fp32", 2, 32, 10_000, 128, torch.float32, None, False),
    ("odd", 3, 5, 1000, 7, torch.bfloat16, None, True),
)


def offline_builds():
    from .offline import SHARED_LIMIT, KernelBuild, dtype_name
    builds = []
    for name, n_queries, q_tokens, n_docs, dim, dtype, k, packed in OFFLINE_SHAPES:
        by_config = {}                  # config -> the targets that pick it (smem decides the stages)
        for cc, smem in SHARED_LIMIT.items():
            cfg = choose_config(n_queries, q_tokens, n_docs, dim, dtype, 132, smem, k)
            by_config.setdefault(cfg, []).append(cc)
        dt = dtype_name(dtype)
        types = {"q_ptr": f"*{dt}", "d_ptr": f"*{dt}", "span_ptr": "*i64", "q_len_ptr": "*i32", "out_ptr": "*fp32",
                 "idx_ptr": "*i64" if k else "*fp32"}
        types.update({a: "i32" for a in ("n_queries", "n_docs", "q_tokens", "n_tokens", "lq_tile", "qpb", "k",
                                          "stride_qn", "stride_ql", "stride_dn", "stride_dt", "stride_on")})
        for cfg, targets in by_config.items():
            rows = _Rows.of(cfg.block_q, n_queries, q_tokens)
            constexprs = dict(DIM=dim, PACKED=packed, HAS_SPAN=True, HAS_Q_LEN=True, MEAN=False, TOPK=k is not None,
                              BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d, BLOCK_K=pow2(dim, 16), QPB_PAD=rows.qpb_pad,
                              GROUP=cfg.group, K_PAD=pow2(k or 1), UPCAST=False, PRECISION="ieee")
            # wgmma / tcgen05 take 64-row tiles and 16-bit operands; smaller or float32 tiles use
            # mma.sync or FMA, which the offline check does not ask of a dot
            builds.append(KernelBuild(
                f"maxsim_{name}_{dt}_BQ{cfg.block_q}_BD{cfg.block_d}_s{cfg.num_stages}", maxsim_kernel, types,
                constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                uses_dot=cfg.block_q >= 64 and dtype != torch.float32, targets=tuple(targets),
                divisible=("stride_qn", "stride_ql", "stride_dn", "stride_dt") if dim % 16 == 0 else ()))
    return builds


# ---------------------------------------------------------------------------------------------
# Custom ops and the public API
# ---------------------------------------------------------------------------------------------
def _kernel_ok(Q: torch.Tensor) -> bool:
    """float64 (the tests' oracle precision) stays on the reference."""
    return use_triton(Q) and Q.dtype in TL_DTYPE


@torch.library.custom_op("fused_ops::maxsim", mutates_args=())
def _maxsim_op(Q: torch.Tensor, D: torch.Tensor, q_lengths: Optional[torch.Tensor],
               d_lengths: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if _kernel_ok(Q):
        return launch_maxsim(Q, D, q_lengths, d_lengths, reduction)
    return reference._maxsim(Q, D, q_lengths, d_lengths, reduction).to(torch.float32)


@_maxsim_op.register_fake
def _(Q, D, q_lengths, d_lengths, reduction):
    return Q.new_empty((Q.shape[0], D.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fused_ops::maxsim_varlen", mutates_args=())
def _maxsim_varlen_op(Q: torch.Tensor, D_packed: torch.Tensor, doc_offsets: torch.Tensor,
                      q_lengths: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if _kernel_ok(Q):
        return launch_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction)
    D, lengths = reference.unpack_documents(D_packed, doc_offsets)
    return reference._maxsim(Q, D, q_lengths, lengths, reduction).to(torch.float32)


@_maxsim_varlen_op.register_fake
def _(Q, D_packed, doc_offsets, q_lengths, reduction):
    return Q.new_empty((Q.shape[0], doc_offsets.shape[0] - 1), dtype=torch.float32)


@torch.library.custom_op("fused_ops::maxsim_topk", mutates_args=())
def _maxsim_topk_op(Q: torch.Tensor, D: torch.Tensor, k: int, q_lengths: Optional[torch.Tensor],
                    d_lengths: Optional[torch.Tensor], reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_ok(Q):
        return launch_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction)
    scores = reference._maxsim(Q, D, q_lengths, d_lengths, reduction).to(torch.float32)
    return reference.ranked_topk(scores, k)


@_maxsim_topk_op.register_fake
def _(Q, D, k, q_lengths, d_lengths, reduction):
    shape = (Q.shape[0], k)
    return Q.new_empty(shape, dtype=torch.float32), Q.new_empty(shape, dtype=torch.int64)


def maxsim(Q: torch.Tensor, D: torch.Tensor, *, q_lengths: Optional[torch.Tensor] = None,
           d_lengths: Optional[torch.Tensor] = None, reduction: str = "sum") -> torch.Tensor:
    """float32 scores [Nq, Nd] of queries Q [Nq, Lq, d] against padded documents D [Nd, Ld, d]."""
    reference.check_maxsim(Q, D, q_lengths, d_lengths, reduction)
    return _maxsim_op(Q, D, q_lengths, d_lengths, reduction)


def maxsim_varlen(Q: torch.Tensor, D_packed: torch.Tensor, doc_offsets: torch.Tensor, *,
                  q_lengths: Optional[torch.Tensor] = None, reduction: str = "sum") -> torch.Tensor:
    """float32 scores [Nq, Nd] against documents packed end to end in D_packed [T, d]."""
    reference.check_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction)
    return _maxsim_varlen_op(Q, D_packed, doc_offsets, q_lengths, reduction)


def maxsim_topk(Q: torch.Tensor, D: torch.Tensor, k: int, *, q_lengths: Optional[torch.Tensor] = None,
                d_lengths: Optional[torch.Tensor] = None, reduction: str = "sum"):
    """(scores float32 [Nq, k], indices int64 [Nq, k]): each query's k best documents, descending."""
    reference.check_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction)
    return _maxsim_topk_op(Q, D, k, q_lengths, d_lengths, reduction)
