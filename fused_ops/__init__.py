"""fused_ops: Triton kernels for MoE routing, expert dispatch and late-interaction scoring.

Every op is a torch custom op (`torch.ops.fused_ops.<name>`): Triton kernels on CUDA, the
plain-torch reference (`fused_ops.reference`) on CPU.
"""
from .layernorm_linear import layernorm_linear
from .maxsim import maxsim, maxsim_topk, maxsim_varlen
from .module import FuseMoE, FuseMoEConfig
from .moe import moe_experts
from .router import fused_router
from .softmax import softmax_laplace
from .topk import topk_gating

__version__ = "0.1.0"

__all__ = [
    "layernorm_linear", "softmax_laplace", "topk_gating", "fused_router", "moe_experts",
    "maxsim", "maxsim_varlen", "maxsim_topk", "FuseMoE", "FuseMoEConfig",
]
