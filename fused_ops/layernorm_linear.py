"""placeholder: replaced by the Triton implementation."""
from . import reference


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5):
    return reference.layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps=eps)
