import pytest
import torch

import fused_ops
from fused_ops import reference

from conftest import DEVICE, DTYPES, assert_topk_match, pick, rand


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E, k", [(1, 1), (2, 1), (2, 2), (7, 3), (8, 4), (64, 8), (60, 60), (513, 5)]
                         + pick([], [(4096, 16), (8192, 3), (16384, 2)]))
@pytest.mark.parametrize("renormalize", [False, True])
def test_matches_reference(dtype, E, k, renormalize):
    probs = reference.softmax_laplace(rand(29, E, scale=2.0)).to(dtype)
    w, i = fused_ops.topk_gating(probs, k, renormalize=renormalize)
    rw, ri = reference.topk_gating(probs.double(), k, renormalize=renormalize)
    assert w.dtype == torch.float32 and i.dtype == torch.int32 and w.shape == (29, k)
    assert_topk_match(i, rw, ri)
    # the weights are the chosen entries (exactly, before renormalisation)
    chosen = probs.float().gather(-1, i.long())
    if renormalize:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    assert torch.allclose(w, chosen, rtol=1e-6, atol=0)
    assert torch.allclose(w.double(), rw, rtol=1e-5, atol=1e-7)


def test_ties_go_to_the_lower_index():
    probs = torch.tensor([[0.2, 0.3, 0.3, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]], device=DEVICE)
    w, i = fused_ops.topk_gating(probs, 3)
    assert i.tolist() == [[1, 2, 4], [0, 1, 2]]
    # many random exact ties: equal to the reference index for index
    levels = torch.randint(0, 4, (200, 16), device=DEVICE).float() / 4
    _, i = fused_ops.topk_gating(levels, 6)
    assert torch.equal(i.long().cpu(), reference.topk_gating(levels, 6)[1].long().cpu())


def test_nan_ranks_last_and_inf_ranks_first():
    inf, nan = float("inf"), float("nan")
    probs = torch.tensor([[nan, 1.0, -inf, inf, nan, -1.0, 0.0, -0.0]], device=DEVICE)
    w, i = fused_ops.topk_gating(probs, 8)
    assert i.tolist() == [[3, 1, 6, 7, 5, 2, 0, 4]]
    assert torch.isnan(w[0, -2:]).all() and w[0, 0] == inf
    ri = reference.topk_gating(probs, 8)[1]
    assert torch.equal(i.cpu(), ri.cpu())


def test_leading_dims_noncontiguous_and_empty():
    probs = rand(5, 3, 12).transpose(0, 1)
    w, i = fused_ops.topk_gating(probs, 4)
    rw, ri = reference.topk_gating(probs.double(), 4)
    assert w.shape == (3, 5, 4) and torch.equal(i.cpu(), ri.cpu())
    w, i = fused_ops.topk_gating(rand(0, 8), 2)
    assert w.shape == (0, 2) and i.shape == (0, 2)


@pytest.mark.parametrize("k", [0, -1, 9])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k"):
        fused_ops.topk_gating(rand(3, 8), k)


def test_bad_types():
    with pytest.raises(TypeError, match="k"):
        fused_ops.topk_gating(rand(3, 8), 2.0)
    with pytest.raises(TypeError, match="probs"):
        fused_ops.topk_gating(torch.ones(3, 8, dtype=torch.int32, device=DEVICE), 2)


def test_opcheck():
    torch.library.opcheck(torch.ops.fused_ops.topk_gating.default, (rand(6, 10), 3, True))
