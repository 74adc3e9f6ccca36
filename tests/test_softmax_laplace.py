import math

import pytest
import torch

import fused_ops
from fused_ops import reference
from fused_ops.softmax import SINGLE_PASS_MAX

from conftest import DEVICE, DTYPES, assert_close, pick, rand

WIDTHS = [1, 7, 8, 64, 1023] + pick([SINGLE_PASS_MAX + 1], [4096, 32000, SINGLE_PASS_MAX + 1, 65536])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_matches_reference(dtype, n):
    rows = 3 if n > 4096 else 37
    x = rand(rows, n, dtype=dtype, scale=4.0)
    out = fused_ops.softmax_laplace(x, temperature=0.7, alpha=0.01)
    ref = reference.softmax_laplace(x.double(), temperature=0.7, alpha=0.01)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close(out, ref, dtype)
    # properties: rows sum to 1, every probability in (0, 1]
    assert torch.allclose(out.double().sum(-1), torch.ones(rows, dtype=torch.float64, device=DEVICE), atol=1e-4)
    assert (out > 0).all() and (out <= 1 + 1e-6).all()


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 100.0])
def test_temperature_and_alpha(temperature, alpha):
    x = rand(5, 33, scale=3.0)
    out = fused_ops.softmax_laplace(x, temperature=temperature, alpha=alpha)
    assert_close(out, reference.softmax_laplace(x.double(), temperature=temperature, alpha=alpha), torch.float32)


def test_leading_dims_and_noncontiguous():
    x = rand(4, 6, 10).transpose(0, 1)                       # [6, 4, 10], not contiguous
    out = fused_ops.softmax_laplace(x, temperature=2.0, alpha=0.1)
    assert out.shape == (6, 4, 10)
    assert_close(out, reference.softmax_laplace(x.double(), temperature=2.0, alpha=0.1), torch.float32)
    strided = rand(8, 20)[:, ::2]                            # last-dim stride 2
    assert_close(fused_ops.softmax_laplace(strided), reference.softmax_laplace(strided.double()), torch.float32)


@pytest.mark.parametrize("n", [5, SINGLE_PASS_MAX + 3])
def test_nan_and_inf_rows_follow_torch(n):
    inf, nan = float("inf"), float("nan")
    x = rand(6, n)
    x[0, 1] = nan                      # NaN: whole row NaN, other rows untouched
    x[1, :] = -inf                     # all -inf: NaN like torch
    x[2, 2] = inf                      # +inf: NaN like torch
    x[3, : n - 1] = -inf               # all but the last -inf: one-hot
    x[4, : n // 2] = -inf              # a leading run of -inf (the online path starts on it)
    out = fused_ops.softmax_laplace(x)
    ref = torch.softmax(x.double(), dim=-1)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.allclose(out[ok].double(), ref[ok], atol=1e-6)


def test_empty_inputs():
    assert fused_ops.softmax_laplace(rand(0, 8)).shape == (0, 8)
    assert fused_ops.softmax_laplace(rand(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"alpha": -0.1}, "alpha"), ({"alpha": math.inf}, "alpha"),
])
def test_bad_scalars(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused_ops.softmax_laplace(rand(2, 4), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="logits"):
        fused_ops.softmax_laplace(torch.ones(2, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        fused_ops.softmax_laplace(rand(()))
    with pytest.raises(TypeError, match="logits"):
        fused_ops.softmax_laplace([1.0, 2.0])


def test_opcheck():
    torch.library.opcheck(torch.ops.fused_ops.softmax_laplace.default, (rand(4, 9), 0.5, 0.01))
