"""placeholder: replaced by the Triton implementation."""
from . import reference


def moe_experts(x, weights, indices, w1, b1, w2, b2, *, activation="gelu_tanh"):
    return reference.moe_experts(x, weights, indices, w1, b1, w2, b2, activation=activation)
