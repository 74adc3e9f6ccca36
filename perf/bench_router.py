"""fused_router and layernorm_linear against torch eager and torch.compile of the same math.

fused_router: x [M, 8320] bf16, E=8, k=4 (FuseMoE's router). The floor is reading x, the gate and
the LayerNorm parameters once and writing k weights and indices per row; the gate's FLOPs
(2*M*K*E) are far under the bf16 rate. Every case is also timed in a CUDA graph (no launch gaps).
layernorm_linear: M=8192, K=8320, N=4096 bf16 against cuBLAS F.linear alone (no LayerNorm: the
bar the fused op should reach) and F.layer_norm + F.linear. The floor is 2*M*N*K FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fused_ops

from .harness import Case

DTYPE = torch.bfloat16
K = 8320
E, TOP_K = 8, 4
TEMPERATURE, ALPHA = 1.0, 0.01


def torch_router(x, g, b, w, wb):
    """The unfused eager pipeline: LayerNorm, gate, temperature softmax, Laplace smoothing, top-k."""
    logits = F.linear(F.layer_norm(x, (x.shape[-1],), g, b, 1e-5), w, wb).float()
    p = (torch.softmax(logits / TEMPERATURE, dim=-1) + ALPHA) / (1 + ALPHA * w.shape[0])
    weights, indices = torch.topk(p, TOP_K, dim=-1)
    return weights, indices.to(torch.int32)


def torch_layernorm_linear(x, g, b, w, bias):
    return F.linear(F.layer_norm(x, (x.shape[-1],), g, b, 1e-5), w, bias)


def _params(N):
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(DTYPE)  # noqa: E731
    return rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)


def _router_cases(quick):
    g, b, w, wb = _params(E)
    compiled = torch.compile(torch_router, dynamic=False)
    out = []
    for M in [32, 8192] if quick else [32, 256, 2048, 8192]:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        nbytes = (M * K + E * K + 2 * K + E) * 2 + M * TOP_K * 8
        call = dict(k=TOP_K, temperature=TEMPERATURE, alpha=ALPHA)
        out.append(Case("fused_router", {"M": M, "K": K, "E": E, "k": TOP_K}, DTYPE, bytes=nbytes,
                        flops=2 * M * K * E, graph=True, providers={
            "fused_ops": lambda x=x: fused_ops.fused_router(x, g, b, w, wb, **call),
            "fused_ops.laplace": lambda x=x: fused_ops.fused_router(x, g, b, w, wb, gating="laplace", **call),
            "torch": lambda x=x: torch_router(x, g, b, w, wb),
            "torch.compile": lambda x=x: compiled(x, g, b, w, wb),
        }))
    return out


def _layernorm_linear_cases(quick):
    N = 4096
    g, b, w, bias = _params(N)
    compiled = torch.compile(torch_layernorm_linear, dynamic=False)
    out = []
    for M in [8192] if quick else [256, 2048, 8192]:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        out.append(Case("layernorm_linear", {"M": M, "K": K, "N": N}, DTYPE, bytes=(M * K + N * K + M * N) * 2,
                        flops=2 * M * N * K, graph=True, providers={
            "fused_ops": lambda x=x: fused_ops.layernorm_linear(x, g, b, w, bias),
            "cublas F.linear (no LN)": lambda x=x: F.linear(x, w, bias),
            "torch": lambda x=x: torch_layernorm_linear(x, g, b, w, bias),
            "torch.compile": lambda x=x: compiled(x, g, b, w, bias),
        }))
    return out


def cases(quick: bool = False) -> list[Case]:
    return _router_cases(quick) + _layernorm_linear_cases(quick)


PLOTS = [("fused_router", "M"), ("layernorm_linear", "M")]
