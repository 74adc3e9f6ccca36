"""MaxSim (maxsim, maxsim_varlen, maxsim_topk) against the PyLate-style einsum path and the two
published Triton kernels, late-interaction-kernels and flash-maxsim (perf-only optional
dependencies: their providers are skipped, with a note, where they are not importable).

Shapes (bf16, d=128, Lq=32, Ld=300, real lengths uniform in [100, 300] unless named):
rerank one query against 100k documents, 16 queries sharing 10k documents, ColPali (Lq=1024,
Ld=1030, full length), and top-100 of 1M documents (Ld=128, lengths in [100, 128]).
Floors count what must move: the real tokens of D (loops stop at real lengths) plus Q, and
2 * Nq * Lq * sum(real Ld) * d FLOPs.
"""
from __future__ import annotations

import torch

import fused_ops

from .harness import Case

try:
    import late_interaction_kernels as lik
except ImportError as exc:
    lik = None
    print(f"  note: late-interaction-kernels is not importable ({exc}); its providers are skipped")
try:
    import flash_maxsim
except ImportError as exc:
    flash_maxsim = None
    print(f"  note: flash-maxsim is not importable ({exc}); its providers are skipped")

DTYPE = torch.bfloat16
DIM = 128
EINSUM_CHUNK = 1 << 28          # similarity elements per einsum chunk (512 MB in bf16)


class _OneCase:
    """Builds a case's tensors on first use and frees the previous case's, so one case's inputs
    (up to ~34 GB for the 1M-document top-k case) are alive at a time."""

    def __init__(self):
        self.key, self.tensors = None, None

    def get(self, key, build):
        if key != self.key:
            self.key = self.tensors = None
            torch.cuda.empty_cache()
            self.tensors = build()
            self.key = key
        return self.tensors


_CURRENT = _OneCase()


def _unit_tokens(shape, generator):
    """Random bf16 token embeddings with unit L2 norm (as ColBERT/ColPali models emit), made in
    slices so no float32 copy of a large D exists."""
    x = torch.randn(shape, dtype=DTYPE, device="cuda", generator=generator)
    for part in x.view(-1, shape[-1]).split(1 << 22):
        part.div_(part.float().norm(dim=-1, keepdim=True).to(DTYPE))
    return x


def _inputs(Nq, Lq, Nd, Ld, lengths, packed):
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = _unit_tokens((Nq, Lq, DIM), g)
    D = _unit_tokens((Nd, Ld, DIM), g)
    lengths = lengths.cuda()
    valid = torch.arange(Ld, device="cuda")[None, :] < lengths[:, None]
    t = {"Q": Q, "D": D, "lengths": lengths, "lengths32": lengths.int(), "valid": valid, "pad": ~valid}
    if packed:
        offsets = torch.zeros(Nd + 1, dtype=torch.int64, device="cuda")
        offsets[1:] = lengths.cumsum(0)
        t.update(D_packed=D[valid], offsets=offsets, offsets32=offsets.int(),
                 q_offsets32=torch.arange(0, (Nq + 1) * Lq, Lq, dtype=torch.int32, device="cuda"),
                 max_len=int(lengths.max()))
    return t


def einsum_maxsim(Q, D, pad):
    """The PyLate-style path: einsum similarities, pads to -inf, max over document tokens, sum
    over query tokens; in document chunks that bound the [Nq, n, Lq, Ld] tensor."""
    Nq, Lq, _ = Q.shape
    Nd, Ld, _ = D.shape
    step = max(1, EINSUM_CHUNK // (Nq * Lq * Ld))
    scores = torch.empty(Nq, Nd, dtype=torch.float32, device=Q.device)
    for s in range(0, Nd, step):
        sim = torch.einsum("qid,njd->qnij", Q, D[s:s + step])
        sim.masked_fill_(pad[None, s:s + step, None, :], float("-inf"))
        scores[:, s:s + step] = sim.amax(dim=-1).sum(dim=-1, dtype=torch.float32)
    return scores


def _flash_maxsim(t):
    if t["Q"].shape[0] == 1:
        return flash_maxsim.flash_maxsim(t["Q"][0], t["D"], doc_lengths=t["lengths32"])
    return flash_maxsim.flash_maxsim_batched(t["Q"], t["D"], doc_lengths=t["lengths32"])


def _lik_varlen(t):
    Nq, Lq, d = t["Q"].shape
    return lik.maxsim_varlen(t["Q"].reshape(Nq * Lq, d), t["D_packed"], t["q_offsets32"], t["offsets32"],
                             max_seqlen_q=Lq, max_seqlen_d=t["max_len"])


def _scoring(t):
    return fused_ops.maxsim(t["Q"], t["D"], d_lengths=t["lengths"])


def _scoring_providers() -> dict:
    """Provider name -> function of the case's tensors, for the maxsim shapes."""
    providers = {
        "fused_ops": _scoring,
        "fused_ops varlen": lambda t: fused_ops.maxsim_varlen(t["Q"], t["D_packed"], t["offsets"]),
        "einsum": lambda t: einsum_maxsim(t["Q"], t["D"], t["pad"]),
    }
    if lik is not None:
        providers["late-interaction-kernels"] = lambda t: lik.maxsim(t["Q"], t["D"], d_mask=t["valid"])
        providers["late-interaction-kernels varlen"] = _lik_varlen
    if flash_maxsim is not None:
        providers["flash-maxsim"] = _flash_maxsim
    return providers


def _topk_providers(k: int) -> dict:
    """The same for the top-k shapes; "fused_ops maxsim" is the scoring alone on the same input."""
    providers = {
        "fused_ops": lambda t: fused_ops.maxsim_topk(t["Q"], t["D"], k, d_lengths=t["lengths"]),
        "fused_ops maxsim (scores only)": _scoring,
        "einsum": lambda t: torch.topk(einsum_maxsim(t["Q"], t["D"], t["pad"]), k),
    }
    if lik is not None:
        providers["late-interaction-kernels"] = lambda t: lik.retrieve(t["Q"], t["D"], top_k=k, d_mask=t["valid"],
                                                                       normalize=False)
    if flash_maxsim is not None:
        providers["flash-maxsim"] = lambda t: torch.topk(_flash_maxsim(t), k)
    return providers


def _case(op, Nq, Lq, Nd, Ld, lo, hi, k=None):
    lengths = torch.randint(lo, hi + 1, (Nd,), generator=torch.Generator().manual_seed(Nd))
    tokens = int(lengths.sum())
    key = (op, Nq, Lq, Nd, Ld, k)

    def get():
        return _CURRENT.get(key, lambda: _inputs(Nq, Lq, Nd, Ld, lengths, packed=k is None))

    shape = {"Nq": Nq, "Lq": Lq, "Nd": Nd, "Ld": Ld, "d": DIM, **({"k": k} if k else {})}
    fns = _scoring_providers() if k is None else _topk_providers(k)
    return Case(op, shape, DTYPE, bytes=(tokens + Nq * Lq) * DIM * 2, flops=2 * Nq * Lq * tokens * DIM,
                providers={name: (lambda fn=fn: fn(get())) for name, fn in fns.items()})


def cases(quick: bool = False) -> list[Case]:
    out = [_case("maxsim", 1, 32, Nd, 300, 100, 300) for Nd in ((100_000,) if quick else (10_000, 100_000))]
    out += [_case("maxsim_batch", Nq, 32, 10_000, 300, 100, 300) for Nq in ((16,) if quick else (4, 16))]
    out.append(_case("maxsim_colpali", 1, 1024, 1000, 1030, 1030, 1030))
    out += [_case("maxsim_topk", 16, 32, Nd, 128, 100, 128, k=100) for Nd in ((1_000_000,) if quick else (100_000, 1_000_000))]
    return out


PLOTS = [("maxsim", "Nd"), ("maxsim_batch", "Nq"), ("maxsim_topk", "Nd")]
