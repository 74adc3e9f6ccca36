"""Every error case of the contract: bad input is rejected before any kernel runs, with a
ValueError/TypeError that names the argument."""
import pytest
import torch

import fused_ops
from fused_ops import FuseMoE, FuseMoEConfig, launch_plans

from conftest import DEVICE, rand

R = rand
x, w = R(4, 16), R(3, 16)
w1, w2 = R(3, 8, 16), R(3, 5, 8)
idx = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
rw = torch.ones(4, 2, device=DEVICE)
Q, D = R(2, 3, 16), R(5, 7, 16)
def meta(*shape):
    """A tensor on a second device that every machine has."""
    return torch.zeros(*shape, device="meta")


CASES = [
    # (id, call, exception, words the message must contain)
    ("ln_mixed_devices", lambda: fused_ops.layernorm_linear(x, None, None, meta(3, 16)), ValueError, ["weight", "device"]),
    ("ln_weight_rank", lambda: fused_ops.layernorm_linear(x, None, None, R(3, 16, 1)), ValueError, ["weight", "dimension"]),
    ("ln_k_mismatch", lambda: fused_ops.layernorm_linear(x, None, None, R(3, 15)), ValueError, ["weight", "16"]),
    ("ln_gamma_shape", lambda: fused_ops.layernorm_linear(x, R(15), None, w), ValueError, ["ln_weight", "(16,)"]),
    ("ln_bias_shape", lambda: fused_ops.layernorm_linear(x, None, None, w, R(4)), ValueError, ["bias", "(3,)"]),
    ("ln_int_input", lambda: fused_ops.layernorm_linear(x.long(), None, None, w), TypeError, ["x", "floating"]),
    ("ln_mixed_dtype", lambda: fused_ops.layernorm_linear(x.half(), None, None, w), TypeError, ["weight", "dtype"]),
    ("ln_eps", lambda: fused_ops.layernorm_linear(x, None, None, w, eps=0.0), ValueError, ["eps"]),
    ("sm_temperature", lambda: fused_ops.softmax_laplace(x, temperature=0.0), ValueError, ["temperature", "0.0"]),
    ("sm_alpha", lambda: fused_ops.softmax_laplace(x, alpha=-1.0), ValueError, ["alpha", "-1.0"]),
    ("sm_int", lambda: fused_ops.softmax_laplace(x.int()), TypeError, ["logits", "int32"]),
    ("topk_k_zero", lambda: fused_ops.topk_gating(x, 0), ValueError, ["k", "16"]),
    ("topk_k_big", lambda: fused_ops.topk_gating(x, 17), ValueError, ["k", "17"]),
    ("router_gating", lambda: fused_ops.fused_router(x, None, None, w, k=1, gating="cosine"), ValueError, ["gating", "cosine"]),
    ("router_k", lambda: fused_ops.fused_router(x, None, None, w, k=4), ValueError, ["k", "4"]),
    ("router_temperature", lambda: fused_ops.fused_router(x, None, None, w, k=1, temperature=-2.0), ValueError, ["temperature"]),
    ("router_alpha", lambda: fused_ops.fused_router(x, None, None, w, k=1, alpha=-0.5), ValueError, ["alpha"]),
    ("router_devices", lambda: fused_ops.fused_router(x, None, None, meta(3, 16), k=1), ValueError, ["device"]),
    ("moe_activation", lambda: fused_ops.moe_experts(x, rw, idx, w1, None, w2, None, activation="tanh"), ValueError, ["activation", "tanh"]),
    ("moe_float_indices", lambda: fused_ops.moe_experts(x, rw, idx.float(), w1, None, w2, None), TypeError, ["indices", "int"]),
    ("moe_w1_k", lambda: fused_ops.moe_experts(x, rw, idx, R(3, 8, 15), None, w2, None), ValueError, ["w1", "16"]),
    ("moe_w2_h", lambda: fused_ops.moe_experts(x, rw, idx, w1, None, R(3, 5, 7), None), ValueError, ["w2"]),
    ("moe_weights_shape", lambda: fused_ops.moe_experts(x, rw[:, :1], idx, w1, None, w2, None), ValueError, ["weights"]),
    ("moe_rows", lambda: fused_ops.moe_experts(x, rw[:3], idx[:3], w1, None, w2, None), ValueError, ["indices", "4"]),
    ("moe_x_rank", lambda: fused_ops.moe_experts(x[None], rw, idx, w1, None, w2, None), ValueError, ["x", "2"]),
    ("moe_b1_shape", lambda: fused_ops.moe_experts(x, rw, idx, w1, R(3, 7), w2, None), ValueError, ["b1"]),
    ("moe_devices", lambda: fused_ops.moe_experts(x, rw, idx, meta(3, 8, 16), None, w2, None), ValueError, ["device"]),
    ("maxsim_dim", lambda: fused_ops.maxsim(Q, R(5, 7, 15)), ValueError, ["D", "dim"]),
    ("maxsim_rank", lambda: fused_ops.maxsim(Q[0], D), ValueError, ["Q", "3"]),
    ("maxsim_reduction", lambda: fused_ops.maxsim(Q, D, reduction="max"), ValueError, ["reduction", "max"]),
    ("maxsim_negative_len", lambda: fused_ops.maxsim(Q, D, d_lengths=torch.tensor([1, -1, 2, 3, 4], device=DEVICE)), ValueError, ["d_lengths", "-1"]),
    ("maxsim_len_above_pad", lambda: fused_ops.maxsim(Q, D, d_lengths=torch.tensor([1, 8, 2, 3, 4], device=DEVICE)), ValueError, ["d_lengths", "8"]),
    ("maxsim_q_len_zero", lambda: fused_ops.maxsim(Q, D, q_lengths=torch.tensor([0, 3], device=DEVICE)), ValueError, ["q_lengths"]),
    ("topk_len_above_pad", lambda: fused_ops.maxsim_topk(Q, D, 2, d_lengths=torch.tensor([1, 9, 2, 3, 4], device=DEVICE, dtype=torch.int32)), ValueError, ["d_lengths", "9"]),
    ("varlen_q_len_above", lambda: fused_ops.maxsim_varlen(Q, R(9, 16), torch.tensor([0, 5, 9], device=DEVICE), q_lengths=torch.tensor([1, 4], device=DEVICE)), ValueError, ["q_lengths", "4"]),
    ("maxsim_dim_zero", lambda: fused_ops.maxsim(R(2, 3, 0), R(5, 7, 0)), ValueError, ["embedding dim", "1"]),
    ("varlen_dim_zero", lambda: fused_ops.maxsim_varlen(R(2, 3, 0), R(9, 0), torch.tensor([0, 9], device=DEVICE)), ValueError, ["embedding dim"]),
    ("maxsim_len_dtype", lambda: fused_ops.maxsim(Q, D, d_lengths=torch.ones(5, device=DEVICE)), TypeError, ["d_lengths", "int"]),
    ("maxsim_devices", lambda: fused_ops.maxsim(Q, meta(5, 7, 16)), ValueError, ["device"]),
    ("varlen_decreasing", lambda: fused_ops.maxsim_varlen(Q, R(9, 16), torch.tensor([0, 5, 3, 9], device=DEVICE)), ValueError, ["doc_offsets", "non-decreasing"]),
    ("varlen_past_end", lambda: fused_ops.maxsim_varlen(Q, R(9, 16), torch.tensor([0, 5, 10], device=DEVICE)), ValueError, ["doc_offsets", "9"]),
    ("topk_docs_k", lambda: fused_ops.maxsim_topk(Q, D, 6), ValueError, ["k", "6"]),
    ("module_grad", lambda: FuseMoE(FuseMoEConfig(d_in=16, d_hidden=8, d_out=4, num_experts=3, top_k=2), device=DEVICE)(
        x.clone().requires_grad_()), RuntimeError, ["inference"]),
    ("module_d_in", lambda: FuseMoE(FuseMoEConfig(d_in=16, d_hidden=8, d_out=4, num_experts=3, top_k=2), device=DEVICE)(
        R(4, 15)), ValueError, ["x", "16"]),
    ("config_activation", lambda: FuseMoEConfig(activation="gelu_fast"), ValueError, ["activation"]),
]


@pytest.fixture
def launches(monkeypatch):
    """Records every Triton kernel launch (compiled or interpreted) instead of running it."""
    import triton.runtime.interpreter
    import triton.runtime.jit
    launched = []
    for cls in (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction):
        monkeypatch.setattr(cls, "run", lambda self, *a, **k: launched.append(self))
    monkeypatch.setattr(launch_plans.Plan, "launch", lambda self, *a: launched.append(self))   # kept kernels
    return launched


def test_the_launch_spy_sees_launches(launches):
    fused_ops.softmax_laplace(x)
    assert launches


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_before_any_kernel(launches, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not launches


def test_noncontiguous_inputs_are_accepted():
    xt = R(16, 4).t()                                 # [4, 16], not contiguous
    assert fused_ops.layernorm_linear(xt, None, None, w).shape == (4, 3)
    assert fused_ops.fused_router(xt, None, None, w, k=2)[0].shape == (4, 2)
    assert fused_ops.moe_experts(xt, rw, idx, w1, None, w2, None).shape == (4, 5)
    assert fused_ops.maxsim(Q.transpose(1, 2).contiguous().transpose(1, 2), D).shape == (2, 5)
