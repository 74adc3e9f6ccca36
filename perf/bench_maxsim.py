"""MaxSim (maxsim, maxsim_varlen, maxsim_topk) against the PyLate-style einsum path and the two
published Triton kernels, late-interaction-kernels and flash-maxsim (perf-only optional
dependencies: their providers are skipped, with a note, where they are not importable).

Shapes (bf16, d=128, Lq=32, Ld=300, real lengths uniform in [100, 300] unless named):
rerank one query against 100k documents, 16 queries sharing 10k documents, ColPali (Lq=1024,
Ld=1030, full length), and top-100 of 1M documents (Ld=128, lengths in [100, 128]).
Floors count what must move: the real tokens of D (loops stop at real lengths) plus Q, and
2 * Nq * Lq * sum(real Ld) * d FLOPs.

A kernel that faults (an illegal address) leaves the CUDA context unusable for the rest of the
process, so no external kernel runs here before it has run in a child process on the same input
and agreed with fused_ops ("vetting", once per case). late-interaction-kernels' maxsim_varlen is
not a provider: it addresses D_packed with int32 offsets ((d_lo + d_off) * stride_d_t), which
wrap past 2^31 elements (100k documents of ~200 tokens x 128) and fault.
"""
from __future__ import annotations

import json
import subprocess
import sys

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
AGREEMENT = 1e-2                # relative RMS difference from fused_ops a vetted peer may show


def _unit_tokens(shape, generator):
    """Random bf16 token embeddings with unit L2 norm (as ColBERT/ColPali models emit), made in
    slices so no float32 copy of a large D exists."""
    x = torch.randn(shape, dtype=DTYPE, device="cuda", generator=generator)
    for part in x.view(-1, shape[-1]).split(1 << 22):
        part.div_(part.float().norm(dim=-1, keepdim=True).to(DTYPE))
    return x


def _lengths(spec):
    return torch.randint(spec["lo"], spec["hi"] + 1, (spec["Nd"],), generator=torch.Generator().manual_seed(spec["Nd"]))


def _inputs(spec, packed):
    """The case's tensors, the same in every process (fixed seeds)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = _unit_tokens((spec["Nq"], spec["Lq"], DIM), g)
    D = _unit_tokens((spec["Nd"], spec["Ld"], DIM), g)
    lengths = _lengths(spec).cuda()
    valid = torch.arange(spec["Ld"], device="cuda")[None, :] < lengths[:, None]
    t = {"Q": Q, "D": D, "lengths": lengths, "lengths32": lengths.int(), "valid": valid, "pad": ~valid}
    if packed:
        offsets = torch.zeros(spec["Nd"] + 1, dtype=torch.int64, device="cuda")
        offsets[1:] = lengths.cumsum(0)
        t.update(D_packed=D[valid], offsets=offsets)
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


def _scoring(t):
    return fused_ops.maxsim(t["Q"], t["D"], d_lengths=t["lengths"])


def _providers(k):
    """(own, external): provider name -> function of the case's tensors. Own providers are this
    project's and the torch einsum path; external ones are the peer packages' kernels, vetted
    before they run in this process. Top-k providers return (values, indices)."""
    if k is None:
        own = {
            "fused_ops": _scoring,
            "fused_ops varlen": lambda t: fused_ops.maxsim_varlen(t["Q"], t["D_packed"], t["offsets"]),
            "einsum": lambda t: einsum_maxsim(t["Q"], t["D"], t["pad"]),
        }
        external = {}
        if lik is not None:
            external["late-interaction-kernels"] = lambda t: lik.maxsim(t["Q"], t["D"], d_mask=t["valid"])
        if flash_maxsim is not None:
            external["flash-maxsim"] = _flash_maxsim
        return own, external
    own = {
        "fused_ops": lambda t: fused_ops.maxsim_topk(t["Q"], t["D"], k, d_lengths=t["lengths"]),
        "fused_ops maxsim (scores only)": _scoring,
        "einsum": lambda t: torch.topk(einsum_maxsim(t["Q"], t["D"], t["pad"]), k),
    }
    external = {}
    if lik is not None:
        external["late-interaction-kernels"] = lambda t: lik.retrieve(t["Q"], t["D"], top_k=k, d_mask=t["valid"],
                                                                      normalize=False)
    if flash_maxsim is not None:
        external["flash-maxsim"] = lambda t: torch.topk(_flash_maxsim(t), k)
    return own, external


# ---------------------------------------------------------------------------------------------
# Vetting external kernels in a child process
# ---------------------------------------------------------------------------------------------
def _disagreement(got, want) -> float:
    """Relative RMS difference of scores (or of top-k values, which both sides sort descending)."""
    if isinstance(want, tuple):
        got, want = got[0], want[0]
    got = got.float().reshape(want.shape)
    return float((got - want).norm() / want.norm())


def _vet_here(spec, names):
    """Child side: run the named external providers in turn, each announced ('running<TAB>NAME')
    and judged ('vetted<TAB>NAME<TAB>ok' or why not); stops after a failure, which may have left
    the CUDA context unusable. A fault kills the process before its verdict is printed."""
    t = _inputs(spec, packed=False)
    k = spec["k"]
    want = _scoring(t) if k is None else fused_ops.maxsim_topk(t["Q"], t["D"], k, d_lengths=t["lengths"])
    external = _providers(k)[1]
    for name in names:
        print(f"running\t{name}", flush=True)
        try:
            err = _disagreement(external[name](t), want)
            verdict = "ok" if err <= AGREEMENT else f"differs from fused_ops by {err:.2e} (relative RMS)"
        except Exception as exc:
            verdict = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        print(f"vetted\t{name}\t{verdict}", flush=True)
        if verdict != "ok":
            return


def _vet(spec, names) -> dict[str, str]:
    """Parent side: name -> 'ok' or the reason it is not run here; a fresh child after each failure."""
    verdicts, left = {}, list(names)
    while left:
        child = subprocess.run([sys.executable, "-m", "perf.bench_maxsim", json.dumps(spec), *left],
                               capture_output=True, text=True)
        decided, running = len(verdicts), None
        for line in child.stdout.splitlines():
            fields = line.split("\t")
            if fields[0] == "running":
                running = fields[1]
            elif fields[0] == "vetted":
                verdicts[fields[1]], running = fields[2], None
        tail = f"exit {child.returncode}: {(child.stderr.strip().splitlines() or ['no output'])[-1]}"
        if running is not None:                    # the child died in it
            verdicts[running] = f"its child process died ({tail})"
        elif len(verdicts) == decided:             # the child failed before any provider ran
            verdicts.update({n: f"the vetting process failed ({tail})" for n in left})
        left = [n for n in left if n not in verdicts]
    return verdicts


class _OneCase:
    """Builds a case's tensors on first use and frees the previous case's, so one case's inputs
    (up to ~34 GB for the 1M-document top-k case) are alive at a time; vets the case's external
    providers first, while this process holds none of its own."""

    def __init__(self):
        self.spec, self.tensors, self.verdicts = None, None, {}

    def get(self, spec, external_names):
        if spec != self.spec:
            self.spec = self.tensors = None
            torch.cuda.empty_cache()
            self.verdicts = _vet(spec, external_names) if external_names else {}
            self.tensors = _inputs(spec, packed=spec["k"] is None)
            self.spec = spec
        return self.tensors


_CURRENT = _OneCase()


def _case(op, Nq, Lq, Nd, Ld, lo, hi, k=None):
    spec = {"op": op, "Nq": Nq, "Lq": Lq, "Nd": Nd, "Ld": Ld, "lo": lo, "hi": hi, "k": k}
    tokens = int(_lengths(spec).sum())
    own, external = _providers(k)

    def get():
        return _CURRENT.get(spec, list(external))

    def vetted(name, fn):
        def call():
            t = get()
            if _CURRENT.verdicts[name] != "ok":          # the harness reports it as skipped
                raise RuntimeError(f"not run: vetting in a child process found {_CURRENT.verdicts[name]}")
            return fn(t)
        return call

    providers = {name: (lambda fn=fn: fn(get())) for name, fn in own.items()}
    providers.update({name: vetted(name, fn) for name, fn in external.items()})
    shape = {"Nq": Nq, "Lq": Lq, "Nd": Nd, "Ld": Ld, "d": DIM, **({"k": k} if k else {})}
    # graph time too: the eager call checks the lengths' range on the host (a sync the contract asks
    # for, skipped under capture), which leaves the GPU idle between calls
    return Case(op, shape, DTYPE, bytes=(tokens + Nq * Lq) * DIM * 2, flops=2 * Nq * Lq * tokens * DIM,
                providers=providers, graph=True)


def cases(quick: bool = False) -> list[Case]:
    out = [_case("maxsim", 1, 32, Nd, 300, 100, 300) for Nd in ((100_000,) if quick else (10_000, 100_000))]
    out += [_case("maxsim_batch", Nq, 32, 10_000, 300, 100, 300) for Nq in ((16,) if quick else (4, 16))]
    out.append(_case("maxsim_colpali", 1, 1024, 1000, 1030, 1030, 1030))
    out += [_case("maxsim_topk", 16, 32, Nd, 128, 100, 128, k=100) for Nd in ((1_000_000,) if quick else (100_000, 1_000_000))]
    return out


PLOTS = [("maxsim", "Nd"), ("maxsim_batch", "Nq"), ("maxsim_topk", "Nd")]


if __name__ == "__main__":          # python -m perf.bench_maxsim SPEC_JSON NAME...: vet in this process
    _vet_here(json.loads(sys.argv[1]), sys.argv[2:])
