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


def test_only_plain_cuda_tensors_in_eager_mode_skip_the_dispatcher():
    """The direct path (no custom-op dispatch) is for plain CUDA tensors in eager mode: CPU tensors,
    FakeTensors (torch.compile, export) and calls under a dispatch mode go through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not _runtime.skips_dispatcher(torch.randn(3))
    with FakeTensorMode():
        fake = torch.empty(3, device="cuda")        # a fake CUDA tensor needs no GPU
    assert fake.is_cuda and not _runtime.skips_dispatcher(fake)
    if torch.cuda.is_available():
        cuda = torch.randn(3, device="cuda")
        assert _runtime.skips_dispatcher(cuda)
        with Passthrough():
            assert not _runtime.skips_dispatcher(cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct path is CUDA-only")
def test_direct_path_and_custom_op_give_the_same_bits():
    x = torch.randn(37, 300, device="cuda", dtype=torch.bfloat16)
    g, b = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    w = torch.randn(8, 300, device="cuda", dtype=torch.bfloat16)
    direct = fused_ops.fused_router(x, g.bfloat16(), b.bfloat16(), w, None, k=3)
    via_op = torch.ops.fused_ops.fused_router(x, g.bfloat16(), b.bfloat16(), w, None, 3, 1.0, 0.0, 1e-5, False,
                                               "softmax")
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])
