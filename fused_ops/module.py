"""FuseMoE: LayerNorm -> gate -> temperature softmax -> Laplace smoothing -> top-k -> experts.

The router reads LN(x); the experts read the raw x (SPEC section 7). Inference only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import reference
from ._checks import choice
from .moe import moe_experts
from .router import fused_router

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class FuseMoEConfig:
    d_in: int = 8320
    d_hidden: int = 4096
    d_out: int = 1536
    num_experts: int = 8
    top_k: int = 4
    temperature: float = 1.0
    laplace_alpha: float = 0.01
    activation: str = "gelu_tanh"
    gating: str = "softmax"
    renormalize: bool = False
    eps: float = 1e-5

    def __post_init__(self):
        op = "FuseMoEConfig"
        for name in ("d_in", "d_hidden", "d_out", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{op}: `top_k` must satisfy 1 <= top_k <= num_experts = {self.num_experts}, "
                             f"got {self.top_k!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{op}: `temperature` must be finite and > 0, got {self.temperature}")
        if not (math.isfinite(self.laplace_alpha) and self.laplace_alpha >= 0):
            raise ValueError(f"{op}: `laplace_alpha` must be finite and >= 0, got {self.laplace_alpha}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"{op}: `eps` must be finite and > 0, got {self.eps}")
        choice(op, "activation", self.activation, reference.ACTIVATIONS)
        choice(op, "gating", self.gating, reference.GATINGS)


def _uniform(shape, fan_in, device, dtype):
    # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound), requires_grad=False)


class FuseMoE(nn.Module):
    """Mixture-of-experts layer with a LayerNorm'd, temperature-softmax, Laplace-smoothed top-k router.

    Parameters are created with requires_grad=False: the module is inference-only.
    """

    def __init__(self, config: FuseMoEConfig = FuseMoEConfig(), *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        choice("FuseMoE", "backend", backend, BACKENDS)
        self.config = config
        self.backend = backend
        c = config
        E = c.num_experts
        self.norm = nn.LayerNorm(c.d_in, eps=c.eps, device=device, dtype=dtype)
        self.gate = nn.Linear(c.d_in, E, device=device, dtype=dtype)
        self.w1 = _uniform((E, c.d_hidden, c.d_in), c.d_in, device, dtype)
        self.b1 = _uniform((E, c.d_hidden), c.d_in, device, dtype)
        self.w2 = _uniform((E, c.d_out, c.d_hidden), c.d_hidden, device, dtype)
        self.b2 = _uniform((E, c.d_out), c.d_hidden, device, dtype)
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, " + ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())

    def resolved_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if x.device.type == "cuda" else "torch"

    def _check_inference(self, x: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if x.requires_grad or any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                "FuseMoE is inference-only (its kernels have no backward): call it under "
                "torch.inference_mode() or torch.no_grad(), or keep inputs and parameters at "
                "requires_grad=False")

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FuseMoE: `x` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != c.d_in:
            raise ValueError(f"FuseMoE: `x` must have shape (..., {c.d_in}) (d_in), got {tuple(x.shape)}")
        if x.dtype != self.w1.dtype or x.device != self.w1.device:
            raise ValueError(f"FuseMoE: `x` must match the module's dtype {self.w1.dtype} and device "
                             f"{self.w1.device}, got dtype {x.dtype} on {x.device}")
        self._check_inference(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, c.d_in)
        use_torch = self.resolved_backend(x) == "torch"
        router = reference.fused_router if use_torch else fused_router
        experts = reference.moe_experts if use_torch else moe_experts
        weights, indices = router(flat, self.norm.weight, self.norm.bias, self.gate.weight, self.gate.bias,
                                  k=c.top_k, temperature=c.temperature, alpha=c.laplace_alpha, eps=c.eps,
                                  renormalize=c.renormalize, gating=c.gating)
        y = experts(flat, weights.to(torch.float32), indices, self.w1, self.b1, self.w2, self.b2,
                    activation=c.activation)
        y = y.reshape(*lead, c.d_out)
        if return_routing:
            return y, (weights.reshape(*lead, c.top_k), indices.reshape(*lead, c.top_k))
        return y
