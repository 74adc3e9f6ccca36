import pytest
import torch

from fused_ops import FuseMoE, FuseMoEConfig, reference

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, pick, rand

SMALL = FuseMoEConfig(d_in=40, d_hidden=24, d_out=12, num_experts=4, top_k=2, laplace_alpha=0.05)


def test_parameters_match_the_spec():
    c = SMALL
    m = FuseMoE(c)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"norm.weight": (c.d_in,), "norm.bias": (c.d_in,), "gate.weight": (c.num_experts, c.d_in),
                      "gate.bias": (c.num_experts,), "w1": (c.num_experts, c.d_hidden, c.d_in),
                      "b1": (c.num_experts, c.d_hidden), "w2": (c.num_experts, c.d_out, c.d_hidden),
                      "b2": (c.num_experts, c.d_out)}
    assert not any(p.requires_grad for p in m.parameters())


def _randomise(m):
    # LayerNorm starts at (1, 0): make it non-trivial so the affine path is exercised
    with torch.no_grad():
        m.norm.weight.copy_(1 + 0.1 * torch.randn_like(m.norm.weight))
        m.norm.bias.copy_(0.1 * torch.randn_like(m.norm.bias))
    return m


@pytest.mark.parametrize("gating", ["softmax", "laplace"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_torch_backend_is_the_composition_of_reference_ops(gating, renormalize):
    import dataclasses
    c = dataclasses.replace(SMALL, gating=gating, renormalize=renormalize)
    m = _randomise(FuseMoE(c, backend="torch", device=DEVICE))
    x = rand(2, 5, c.d_in)
    y, (w, i) = m(x, return_routing=True)
    assert y.shape == (2, 5, c.d_out) and w.shape == (2, 5, c.top_k) and i.dtype == torch.int32
    flat = x.reshape(-1, c.d_in)
    rw, ri = reference.fused_router(flat, m.norm.weight, m.norm.bias, m.gate.weight, m.gate.bias, k=c.top_k,
                                    temperature=c.temperature, alpha=c.laplace_alpha, renormalize=renormalize,
                                    gating=gating)
    ry = reference.moe_experts(flat, rw, ri, m.w1, m.b1, m.w2, m.b2, activation=c.activation)
    assert torch.equal(y.reshape(-1, c.d_out), ry)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_matches_torch_backend(dtype):
    torch_m = _randomise(FuseMoE(SMALL, backend="torch", device=DEVICE, dtype=dtype))
    triton_m = FuseMoE(SMALL, backend="triton", device=DEVICE, dtype=dtype)
    triton_m.load_state_dict(torch_m.state_dict())
    x = rand(pick(7, 300), SMALL.d_in, dtype=dtype)
    y_ref, (w_ref, i_ref) = torch_m(x, return_routing=True)
    y, (w, i) = triton_m(x, return_routing=True)
    assert_close(w, w_ref, dtype)
    agree = (i == i_ref).all(-1)
    # rows whose routing differs only because of near-tied probabilities are compared by routing alone
    assert agree.float().mean() > 0.95
    assert_close(y[agree], y_ref[agree], dtype)


def test_auto_backend_picks_by_device():
    m = FuseMoE(SMALL, device=DEVICE)
    assert m.resolved_backend(rand(1, SMALL.d_in)) == ("triton" if ON_GPU else "torch")


def test_grad_mode_is_refused_with_a_clear_message():
    m = FuseMoE(SMALL)
    x = rand(3, SMALL.d_in, device="cpu").requires_grad_()
    with pytest.raises(RuntimeError, match="inference_mode"):
        m(x)
    m.w1.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no_grad"):
        m(rand(3, SMALL.d_in, device="cpu"))
    with torch.no_grad():
        assert m(x).shape == (3, SMALL.d_out)


def test_bad_input_and_config():
    m = FuseMoE(SMALL)
    with pytest.raises(ValueError, match="d_in"):
        m(rand(3, SMALL.d_in + 1, device="cpu"))
    with pytest.raises(ValueError, match="dtype"):
        m(rand(3, SMALL.d_in, device="cpu", dtype=torch.float16))
    with pytest.raises(ValueError, match="top_k"):
        FuseMoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="temperature"):
        FuseMoEConfig(temperature=0.0)
    with pytest.raises(ValueError, match="gating"):
        FuseMoEConfig(gating="cosine")
    with pytest.raises(ValueError, match="backend"):
        FuseMoE(SMALL, backend="cuda")


def test_empty_batch():
    m = FuseMoE(SMALL, device=DEVICE)
    assert m(rand(0, SMALL.d_in)).shape == (0, SMALL.d_out)


def test_reference_shape_on_the_torch_backend():
    """The full reference shape (d_in 8320, hidden 4096, d_out 1536, 8 experts, top-4) in float32."""
    m = FuseMoE(FuseMoEConfig(), backend="torch", device=DEVICE)
    x = rand(3, 8320)
    y, (w, i) = m(x, return_routing=True)
    assert y.shape == (3, 1536) and torch.isfinite(y).all()
    assert ((w > 0) & (w < 1)).all() and (i >= 0).all() and (i < 8).all()
