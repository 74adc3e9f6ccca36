"""Plain-torch implementations of every op in the API contract.

These are the CPU path and the test oracle. Each public function validates its arguments with the
`check_*` function of the same op (the Triton ops call the same checks), then computes in float32,
or in float64 when given float64 inputs (the tests' oracle precision).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from ._value_checks import ValueChecks

ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
GATINGS = ("softmax", "laplace")
REDUCTIONS = ("sum", "mean")


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64 (oracle mode), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _up(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. layernorm_linear
# ---------------------------------------------------------------------------------------------
def check_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps, op="layernorm_linear"):
    C.tensor(op, "x", x, min_ndim=1)
    C.optional_tensor(op, "ln_weight", ln_weight, ndim=1)
    C.optional_tensor(op, "ln_bias", ln_bias, ndim=1)
    C.tensor(op, "weight", weight, ndim=2)
    C.optional_tensor(op, "bias", bias, ndim=1)
    named = [("x", x), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("weight", weight), ("bias", bias)]
    C.same_device(op, named)
    C.same_dtype(op, named)
    K = x.shape[-1]
    C.shape(op, "ln_weight", ln_weight, (K,), "K = x.shape[-1]")
    C.shape(op, "ln_bias", ln_bias, (K,), "K = x.shape[-1]")
    if weight.shape[1] != K:
        raise ValueError(f"{op}: `weight` must have shape (N, {K}) to match x.shape[-1] = {K}, "
                         f"got {tuple(weight.shape)}")
    C.shape(op, "bias", bias, (weight.shape[0],), "N = weight.shape[0]")
    C.positive_finite(op, "eps", eps)


def _layer_norm(x, ln_weight, ln_bias, eps, dtype):
    return F.layer_norm(x.to(dtype), (x.shape[-1],), _up(ln_weight, dtype), _up(ln_bias, dtype), eps)


def _layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps):
    dt = compute_dtype(x)
    y = F.linear(_layer_norm(x, ln_weight, ln_bias, eps, dt), weight.to(dt), _up(bias, dt))
    return y.to(x.dtype)


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5):
    check_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps)
    return _layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# 2. softmax_laplace
# ---------------------------------------------------------------------------------------------
def check_softmax_laplace(logits, temperature, alpha, op="softmax_laplace"):
    C.tensor(op, "logits", logits, min_ndim=1)
    C.positive_finite(op, "temperature", temperature)
    C.nonnegative_finite(op, "alpha", alpha)


def _softmax_laplace(logits, temperature, alpha):
    dt = compute_dtype(logits)
    p = torch.softmax(logits.to(dt) / temperature, dim=-1)
    return (p + alpha) / (1.0 + alpha * logits.shape[-1])


def softmax_laplace(logits, *, temperature=1.0, alpha=0.0):
    check_softmax_laplace(logits, temperature, alpha)
    return _softmax_laplace(logits, temperature, alpha)


# ---------------------------------------------------------------------------------------------
# 3. topk_gating
# ---------------------------------------------------------------------------------------------
def check_topk_gating(probs, k, op="topk_gating"):
    C.tensor(op, "probs", probs, min_ndim=1)
    C.k_in_range(op, k, probs.shape[-1], "probs.shape[-1]")


def ranked_topk(values: torch.Tensor, k: int):
    """Top-k along the last dim: descending, ties to the lower index, NaN below every number.

    Two stable sorts: by value with NaN taken as -inf, then NaNs moved behind the numbers; the
    stability of each keeps equal values (and the NaNs among themselves) in index order.
    """
    nan = torch.isnan(values)
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)
    top = order[..., :k]
    return values.gather(-1, top), top


def _topk_gating(probs, k, renormalize):
    dt = compute_dtype(probs)
    weights, idx = ranked_topk(probs.to(dt), k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx.to(torch.int32)


def topk_gating(probs, k, *, renormalize=False):
    check_topk_gating(probs, k)
    return _topk_gating(probs, k, renormalize)


# ---------------------------------------------------------------------------------------------
# 4. fused_router
# ---------------------------------------------------------------------------------------------
def check_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, gating,
                       op="fused_router"):
    C.choice(op, "gating", gating, GATINGS)
    check_layernorm_linear(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, op=op)
    C.k_in_range(op, k, gate_weight.shape[0], "gate_weight.shape[0] (number of experts)")
    C.positive_finite(op, "temperature", temperature)
    C.nonnegative_finite(op, "alpha", alpha)


def router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating):
    """Gate logits on LN(x): inner product ("softmax") or negative Euclidean distance ("laplace")."""
    dt = compute_dtype(x)
    h = _layer_norm(x, ln_weight, ln_bias, eps, dt)
    w = gate_weight.to(dt)
    if gating == "softmax":
        return F.linear(h, w, _up(gate_bias, dt))
    flat = h.reshape(-1, h.shape[-1])
    dist = torch.cdist(flat, w, compute_mode="donot_use_mm_for_euclid_dist").reshape(*h.shape[:-1], w.shape[0])
    logits = -dist
    return logits if gate_bias is None else logits + gate_bias.to(dt)


def _fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, renormalize, gating):
    logits = router_logits(x, ln_weight, ln_bias, gate_weight, gate_bias, eps, gating)
    return _topk_gating(_softmax_laplace(logits, temperature, alpha), k, renormalize)


def fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias=None, *, k, temperature=1.0, alpha=0.0,
                 eps=1e-5, renormalize=False, gating="softmax"):
    check_fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps, gating)
    return _fused_router(x, ln_weight, ln_bias, gate_weight, gate_bias, k, temperature, alpha, eps,
                         renormalize, gating)


# ---------------------------------------------------------------------------------------------
# 5. moe_experts
# ---------------------------------------------------------------------------------------------
def check_moe_experts(x, weights, indices, w1, b1, w2, b2, activation, op="moe_experts"):
    C.tensor(op, "x", x, ndim=2)
    C.tensor(op, "weights", weights, ndim=2)
    C.tensor(op, "indices", indices, ndim=2, kind="index")
    C.tensor(op, "w1", w1, ndim=3)
    C.optional_tensor(op, "b1", b1, ndim=2)
    C.tensor(op, "w2", w2, ndim=3)
    C.optional_tensor(op, "b2", b2, ndim=2)
    C.choice(op, "activation", activation, ACTIVATIONS)
    C.same_device(op, [("x", x), ("weights", weights), ("indices", indices), ("w1", w1), ("b1", b1),
                       ("w2", w2), ("b2", b2)])
    C.same_dtype(op, [("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)])
    if weights.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: `weights` must be float32 or x's dtype {x.dtype}, got {weights.dtype}")
    M, K = x.shape
    E, H = w1.shape[0], w1.shape[1]
    if w1.shape[2] != K:
        raise ValueError(f"{op}: `w1` must have shape (E, H, {K}) to match x.shape[1] = {K}, got {tuple(w1.shape)}")
    if w2.shape[0] != E or w2.shape[2] != H:
        raise ValueError(f"{op}: `w2` must have shape ({E}, N, {H}) to match w1 (E={E}, H={H}), "
                         f"got {tuple(w2.shape)}")
    C.shape(op, "b1", b1, (E, H), "(E, H) of w1")
    C.shape(op, "b2", b2, (E, w2.shape[1]), "(E, N) of w2")
    if indices.shape[0] != M:
        raise ValueError(f"{op}: `indices` must have {M} rows to match x, got {tuple(indices.shape)}")
    C.shape(op, "weights", weights, tuple(indices.shape), "same as indices")
    if indices.shape[1] < 1:
        raise ValueError(f"{op}: `indices` must have at least one slot per token, got {tuple(indices.shape)}")


def check_indices_range(indices: torch.Tensor, num_experts: int, op="moe_experts") -> None:
    """Value check: costs a sync on CUDA, so callers do it only where a sync is allowed (it is
    never skipped here)."""
    if indices.numel() == 0:
        return

    def in_range(values):
        lo, hi = values
        if lo < 0 or hi >= num_experts:
            return f"{op}: `indices` must lie in [0, {num_experts}) (E = w1.shape[0]), got values in [{lo}, {hi}]"

    checks = ValueChecks()
    checks.add(indices, lambda: torch.aminmax(indices), in_range, force=True)
    checks.start().verify()


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def _moe_experts(x, weights, indices, w1, b1, w2, b2, activation):
    """The computation of moe_experts without its checks (indices must lie in [0, E))."""
    dt = compute_dtype(x, weights)
    M, N = x.shape[0], w2.shape[1]
    y = torch.zeros(M, N, dtype=dt, device=x.device)
    flat_idx = indices.reshape(-1).long()
    tokens = torch.arange(M, device=x.device).repeat_interleave(indices.shape[1])
    flat_w = weights.reshape(-1).to(dt)
    for e in range(w1.shape[0]):
        sel = (flat_idx == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rows = tokens[sel]
        h = activate(F.linear(x[rows].to(dt), w1[e].to(dt), None if b1 is None else b1[e].to(dt)), activation)
        o = F.linear(h, w2[e].to(dt), None if b2 is None else b2[e].to(dt))
        y.index_add_(0, rows, o * flat_w[sel, None])
    return y.to(x.dtype)


def moe_experts(x, weights, indices, w1, b1, w2, b2, *, activation="gelu_tanh"):
    check_moe_experts(x, weights, indices, w1, b1, w2, b2, activation)
    check_indices_range(indices, w1.shape[0])
    return _moe_experts(x, weights, indices, w1, b1, w2, b2, activation)


# ---------------------------------------------------------------------------------------------
# 6. MaxSim
# ---------------------------------------------------------------------------------------------
def _check_lengths(checks, op, name, lengths, count, padded, min_value):
    if lengths is None:
        return
    C.tensor(op, name, lengths, ndim=1, kind="index")
    if lengths.shape[0] != count:
        raise ValueError(f"{op}: `{name}` must have shape ({count},), got {tuple(lengths.shape)}")
    if not lengths.numel():
        return

    def in_range(values):
        lo, hi = values
        if lo < min_value or hi > padded:
            return f"{op}: `{name}` must lie in [{min_value}, {padded}] (the padded length), got values in [{lo}, {hi}]"

    checks.add(lengths, lambda: torch.aminmax(lengths), in_range)


def _check_query_dims(op, Q, name, docs):
    """Q [Nq, Lq, d]: at least one token per query, d >= 1 and the documents' d (their last dim)."""
    if Q.shape[2] != docs.shape[-1]:
        raise ValueError(f"{op}: `Q` and `{name}` must share the embedding dim, got Q {tuple(Q.shape)} "
                         f"and {name} {tuple(docs.shape)}")
    if Q.shape[1] < 1:
        raise ValueError(f"{op}: `Q` must have at least one token per query, got {tuple(Q.shape)}")
    if Q.shape[2] < 1:
        raise ValueError(f"{op}: the embedding dim must be at least 1, got Q {tuple(Q.shape)}")


def _started(checks, defer):
    """The value checks, copy started; verified here unless the caller defers (see ValueChecks)."""
    checks.start()
    if not defer:
        checks.verify()
    return checks


def check_maxsim(Q, D, q_lengths, d_lengths, reduction, op="maxsim", defer=False) -> ValueChecks:
    """Raise on bad arguments. The lengths' range is read from the device: with defer the copy is
    only started, and the caller verifies the returned checks before its kernel runs."""
    C.tensor(op, "Q", Q, ndim=3)
    C.tensor(op, "D", D, ndim=3)
    C.same_device(op, [("Q", Q), ("D", D), ("q_lengths", q_lengths), ("d_lengths", d_lengths)])
    C.same_dtype(op, [("Q", Q), ("D", D)])
    _check_query_dims(op, Q, "D", D)
    C.choice(op, "reduction", reduction, REDUCTIONS)
    checks = ValueChecks()
    _check_lengths(checks, op, "q_lengths", q_lengths, Q.shape[0], Q.shape[1], 1)
    _check_lengths(checks, op, "d_lengths", d_lengths, D.shape[0], D.shape[1], 0)
    return _started(checks, defer)


def check_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction, op="maxsim_varlen",
                        defer=False) -> ValueChecks:
    C.tensor(op, "Q", Q, ndim=3)
    C.tensor(op, "D_packed", D_packed, ndim=2)
    C.tensor(op, "doc_offsets", doc_offsets, ndim=1, kind="index")
    C.same_device(op, [("Q", Q), ("D_packed", D_packed), ("doc_offsets", doc_offsets), ("q_lengths", q_lengths)])
    C.same_dtype(op, [("Q", Q), ("D_packed", D_packed)])
    _check_query_dims(op, Q, "D_packed", D_packed)
    if doc_offsets.shape[0] < 1:
        raise ValueError(f"{op}: `doc_offsets` must have Nd + 1 >= 1 entries, got {tuple(doc_offsets.shape)}")
    C.choice(op, "reduction", reduction, REDUCTIONS)
    checks = ValueChecks()
    _check_lengths(checks, op, "q_lengths", q_lengths, Q.shape[0], Q.shape[1], 1)
    T = D_packed.shape[0]

    def ordered_in_range(values):
        first, last, min_step = values
        if first < 0 or last > T:
            return f"{op}: `doc_offsets` must lie in [0, {T}] (D_packed rows), got first {first}, last {last}"
        if min_step < 0:
            return f"{op}: `doc_offsets` must be non-decreasing, got a decrease"

    def scalars():
        steps = doc_offsets[1:] - doc_offsets[:-1]
        return doc_offsets[0], doc_offsets[-1], steps.min() if steps.numel() else doc_offsets[0] * 0

    checks.add(doc_offsets, scalars, ordered_in_range)
    return _started(checks, defer)


def check_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction, op="maxsim_topk", defer=False) -> ValueChecks:
    checks = check_maxsim(Q, D, q_lengths, d_lengths, reduction, op=op, defer=True)
    C.k_in_range(op, k, D.shape[0], "D.shape[0] (number of documents)")
    return _started(checks, defer)


def _maxsim(Q, D, q_lengths, d_lengths, reduction):
    dt = compute_dtype(Q)
    Nq, Lq, _ = Q.shape
    Nd, Ld, _ = D.shape
    doc_chunk = max(1, (1 << 24) // max(1, Nq * Lq * Ld))                     # bounds the [q, n, i, j] tile
    dev = Q.device
    ql = torch.full((Nq,), Lq, device=dev) if q_lengths is None else q_lengths.long()
    dl = torch.full((Nd,), Ld, device=dev) if d_lengths is None else d_lengths.long()
    q_valid = torch.arange(Lq, device=dev)[None, :] < ql[:, None]            # [Nq, Lq]
    d_pad = torch.arange(Ld, device=dev)[None, :] >= dl[:, None]             # [Nd, Ld]
    Qf = Q.to(dt)
    scores = torch.empty(Nq, Nd, dtype=dt, device=dev)
    for s in range(0, Nd, doc_chunk):
        Dc = D[s:s + doc_chunk].to(dt)
        sim = torch.einsum("qid,njd->qnij", Qf, Dc)                          # [Nq, n, Lq, Ld]
        sim = sim.masked_fill(d_pad[s:s + doc_chunk][None, :, None, :], float("-inf"))
        best = sim.amax(dim=-1) if Ld > 0 else sim.new_full(sim.shape[:-1], float("-inf"))
        best = torch.where(q_valid[:, None, :], best, torch.zeros((), dtype=dt, device=dev))
        scores[:, s:s + doc_chunk] = best.sum(dim=-1)
    if reduction == "mean":
        scores = scores / ql[:, None].to(dt)
    return scores


def maxsim(Q, D, *, q_lengths=None, d_lengths=None, reduction="sum"):
    check_maxsim(Q, D, q_lengths, d_lengths, reduction)
    return _maxsim(Q, D, q_lengths, d_lengths, reduction)


def unpack_documents(D_packed, doc_offsets):
    """Packed rows + offsets -> zero-padded [Nd, Lmax, d] and lengths [Nd]."""
    offs = doc_offsets.long()
    lengths = offs[1:] - offs[:-1]
    Nd = lengths.numel()
    Lmax = int(lengths.max()) if Nd else 0
    padded = D_packed.new_zeros(Nd, Lmax, D_packed.shape[1])
    pos = torch.arange(Lmax, device=D_packed.device)
    valid = pos[None, :] < lengths[:, None]
    padded[valid] = D_packed[(offs[:-1, None] + pos[None, :])[valid]]
    return padded, lengths


def maxsim_varlen(Q, D_packed, doc_offsets, *, q_lengths=None, reduction="sum"):
    check_maxsim_varlen(Q, D_packed, doc_offsets, q_lengths, reduction)
    D, lengths = unpack_documents(D_packed, doc_offsets)
    return _maxsim(Q, D, q_lengths, lengths, reduction)


def maxsim_topk(Q, D, k, *, q_lengths=None, d_lengths=None, reduction="sum"):
    check_maxsim_topk(Q, D, k, q_lengths, d_lengths, reduction)
    scores, idx = ranked_topk(_maxsim(Q, D, q_lengths, d_lengths, reduction), k)
    return scores, idx
