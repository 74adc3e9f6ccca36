"""CPU tensors take the plain-torch reference path unless the interpreter is on; the custom ops
are registered under torch.ops.fused_ops."""
import pytest
import torch

import fused_ops
from fused_ops import _runtime, reference, softmax, topk

OPS = ["layernorm_linear", "softmax_laplace", "topk_gating", "fused_router", "moe_experts", "maxsim",
       "maxsim_varlen", "maxsim_topk"]


@pytest.mark.parametrize("name", OPS)
def test_registered_as_custom_op(name):
    assert hasattr(torch.ops.fused_ops, name)


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRET", False)

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton launcher ran for a CPU tensor")

    monkeypatch.setattr(softmax, "launch_softmax_laplace", refuse)
    monkeypatch.setattr(topk, "launch_topk_gating", refuse)
    x = torch.randn(4, 9)
    p = fused_ops.softmax_laplace(x, temperature=0.5, alpha=0.1)
    assert torch.equal(p, reference.softmax_laplace(x, temperature=0.5, alpha=0.1))
    w, i = fused_ops.topk_gating(p, 3)
    rw, ri = reference.topk_gating(p, 3)
    assert torch.equal(w, rw) and torch.equal(i, ri)
