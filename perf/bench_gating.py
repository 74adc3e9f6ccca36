"""softmax_laplace and topk_gating against torch eager and torch.compile."""
from __future__ import annotations

import torch

import fused_ops
from fused_ops import reference

from .harness import Case


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _softmax_eager(x, t, a):
    p = torch.softmax(x.float() / t, dim=-1)
    return (p + a) / (1 + a * x.shape[-1])


def _topk_eager(p, k):
    w, i = torch.topk(p.float(), k, dim=-1)
    return w, i.to(torch.int32)


def cases(quick: bool = False) -> list[Case]:
    out = []
    dt = torch.bfloat16
    softmax_shapes = [(32768, 8), (8192, 32000)] if quick else \
        [(32, 8), (32768, 8), (8192, 64), (4096, 4096), (8192, 32000), (1024, 65536)]
    softmax_compiled = _compiled(_softmax_eager)
    for M, N in softmax_shapes:
        x = torch.randn(M, N, device="cuda", dtype=dt)
        out.append(Case("softmax_laplace", {"M": M, "N": N}, dt, bytes=M * N * (2 + 4), flops=0, providers={
            "fused_ops": lambda x=x: fused_ops.softmax_laplace(x, temperature=0.7, alpha=0.01),
            "torch": lambda x=x: _softmax_eager(x, 0.7, 0.01),
            "torch.compile": lambda x=x: softmax_compiled(x, 0.7, 0.01),
        }, graph=M * N <= 1 << 20))
    topk_shapes = [(8192, 64, 8)] if quick else [(32, 8, 4), (8192, 8, 4), (8192, 64, 8), (65536, 128, 8)]
    topk_compiled = _compiled(_topk_eager)
    for M, E, k in topk_shapes:
        p = reference.softmax_laplace(torch.randn(M, E, device="cuda"))
        out.append(Case("topk_gating", {"M": M, "E": E, "k": k}, torch.float32, bytes=M * E * 4 + M * k * 8,
                        flops=0, providers={
            "fused_ops": lambda p=p, k=k: fused_ops.topk_gating(p, k),
            "torch": lambda p=p, k=k: _topk_eager(p, k),
            "torch.compile": lambda p=p, k=k: topk_compiled(p, k),
        }, graph=M * E <= 1 << 20))
    return out


PLOTS = [("softmax_laplace", "N"), ("topk_gating", "M")]
