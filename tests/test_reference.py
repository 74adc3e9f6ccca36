"""The oracle against independent, naive (loop) forms of the SPEC semantics."""
import math

import pytest
import torch
import torch.nn.functional as F

from fused_ops import reference

from conftest import rand


def test_layernorm_linear_matches_definition():
    x, g, b, w, bias = rand(5, 13, device="cpu"), rand(13, device="cpu"), rand(13, device="cpu"), \
        rand(4, 13, device="cpu"), rand(4, device="cpu")
    y = reference.layernorm_linear(x.double(), g.double(), b.double(), w.double(), bias.double(), eps=1e-3)
    mu = x.double().mean(-1, keepdim=True)
    var = ((x.double() - mu) ** 2).mean(-1, keepdim=True)
    h = (x.double() - mu) / torch.sqrt(var + 1e-3) * g.double() + b.double()
    assert torch.allclose(y, h @ w.double().T + bias.double())


def test_laplace_gate_is_negative_euclidean_distance():
    x, w, gb = rand(6, 9, device="cpu").double(), rand(5, 9, device="cpu").double(), rand(5, device="cpu").double()
    logits = reference.router_logits(x, None, None, w, gb, 1e-5, "laplace")
    h = F.layer_norm(x, (9,), eps=1e-5)
    naive = torch.stack([-torch.sqrt(((h[m] - w) ** 2).sum(-1)) for m in range(6)]) + gb
    assert torch.allclose(logits, naive)


def test_router_pipeline():
    x, w = rand(7, 16, device="cpu").double(), rand(6, 16, device="cpu").double()
    weights, idx = reference.fused_router(x, None, None, w, None, k=2, temperature=0.5, alpha=0.1, renormalize=True)
    p = torch.softmax(F.layer_norm(x, (16,)) @ w.T / 0.5, -1)
    p = (p + 0.1) / (1 + 0.1 * 6)
    top = p.topk(2).values
    assert torch.allclose(weights, top / top.sum(-1, keepdim=True))
    assert idx.dtype == torch.int32


def test_topk_order_ties_nan():
    v = torch.tensor([[0.5, float("nan"), 0.5, -float("inf"), 0.7, 0.5]])
    w, i = reference.topk_gating(v, 6)
    assert i.tolist() == [[4, 0, 2, 5, 3, 1]]
    assert torch.isnan(w[0, -1])


@pytest.mark.parametrize("activation, fn", [
    ("gelu_tanh", lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))),
    ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
    ("relu", lambda h: h.clamp_min(0)),
    ("silu", lambda h: h * torch.sigmoid(h)),
])
def test_moe_experts_matches_per_token_loop(activation, fn):
    M, K, H, N, E, k = 9, 6, 5, 4, 3, 2
    x = rand(M, K, device="cpu").double()
    w1, b1, w2, b2 = (rand(E, H, K, device="cpu").double(), rand(E, H, device="cpu").double(),
                      rand(E, N, H, device="cpu").double(), rand(E, N, device="cpu").double())
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(M)])
    wts = torch.rand(M, k, dtype=torch.float64)
    y = reference.moe_experts(x, wts, idx, w1, b1, w2, b2, activation=activation)
    naive = torch.zeros(M, N, dtype=torch.float64)
    for m in range(M):
        for j in range(k):
            e = idx[m, j]
            naive[m] += wts[m, j] * (fn(x[m] @ w1[e].T + b1[e]) @ w2[e].T + b2[e])
    assert torch.allclose(y, naive)


def test_moe_experts_rejects_out_of_range_indices():
    x = rand(2, 4, device="cpu")
    w1, w2 = rand(3, 5, 4, device="cpu"), rand(3, 6, 5, device="cpu")
    with pytest.raises(ValueError, match="indices"):
        reference.moe_experts(x, torch.ones(2, 1), torch.tensor([[0], [3]]), w1, None, w2, None)


def _naive_maxsim(Q, D, ql, dl, reduction):
    out = torch.empty(Q.shape[0], D.shape[0], dtype=torch.float64)
    for q in range(Q.shape[0]):
        for n in range(D.shape[0]):
            if dl[n] == 0:
                out[q, n] = -math.inf
                continue
            s = sum(max(float(Q[q, i] @ D[n, j]) for j in range(dl[n])) for i in range(ql[q]))
            out[q, n] = s / ql[q] if reduction == "mean" else s
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_maxsim_padded_and_packed(reduction):
    Q, D = rand(3, 4, 5, device="cpu").double(), rand(4, 6, 5, device="cpu").double()
    ql, dl = torch.tensor([4, 1, 2]), torch.tensor([6, 0, 1, 3])
    D[1:, 3:] = 0.0                                 # pads that would win a max taken over zeros
    naive = _naive_maxsim(Q, D, ql, dl, reduction)
    got = reference.maxsim(Q, D, q_lengths=ql, d_lengths=dl, reduction=reduction)
    assert torch.allclose(got, naive)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), dl.cumsum(0)])
    packed = torch.cat([D[n, : dl[n]] for n in range(4)])
    assert torch.allclose(reference.maxsim_varlen(Q, packed, offsets, q_lengths=ql, reduction=reduction), naive)
    scores, idx = reference.maxsim_topk(Q, D, 2, q_lengths=ql, d_lengths=dl, reduction=reduction)
    assert idx.dtype == torch.int64
    assert torch.allclose(scores, naive.sort(dim=-1, descending=True, stable=True).values[:, :2])


@pytest.mark.parametrize("call, message", [
    (lambda: reference.maxsim(rand(2, 3, 4, device="cpu"), rand(2, 5, 4, device="cpu"),
                              d_lengths=torch.tensor([6, 1])), "d_lengths"),
    (lambda: reference.maxsim(rand(2, 3, 4, device="cpu"), rand(2, 5, 4, device="cpu"),
                              q_lengths=torch.tensor([0, 1])), "q_lengths"),
    (lambda: reference.maxsim_varlen(rand(2, 3, 4, device="cpu"), rand(9, 4, device="cpu"),
                                     torch.tensor([0, 5, 3])), "doc_offsets"),
    (lambda: reference.maxsim(rand(2, 3, 4, device="cpu"), rand(2, 5, 3, device="cpu")), "embedding dim"),
    (lambda: reference.maxsim_topk(rand(2, 3, 4, device="cpu"), rand(2, 5, 4, device="cpu"), 3), "k"),
])
def test_maxsim_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
