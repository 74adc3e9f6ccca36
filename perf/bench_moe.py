"""moe_experts against the per-expert torch loop, torch._grouped_mm on expert-sorted tokens and
torch.compile of the loop; and the whole FuseMoE forward (router + experts) at batch 32.

Reference shape, bf16: K=8320, H=4096, N=1536, E=8, k=4, gelu_tanh; routing is the top-k of random
logits with softmax weights (float32 weights, int32 indices, as FuseMoE passes them).
Floors: bytes = the weights and biases of every expert that receives a token, read once, + x +
routing + y (646 MB of weights when all 8 experts are used; 4 of 8 at M=1);
FLOPs = 2 M k (K H + H N). The loop and its compiled form sync on the host (nonzero per expert),
so only the sync-free providers get a CUDA-graph timing. Each size also prints moe_experts' peak
memory beyond its inputs and y: h [M k, H] and the slot outputs [M k, N] in bf16, plus routing scratch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fused_ops

from .harness import Case

DTYPE = torch.bfloat16
K, H, N, E, TOP_K = 8320, 4096, 1536, 8, 4
GRAPH_MAX_M = 256


def torch_loop(x, weights, indices, w1, b1, w2, b2):
    """The eager per-expert loop: index the expert's tokens, linear, gelu, linear, index_add."""
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.where(indices == e)
        h = F.gelu(F.linear(x[token], w1[e], b1[e]), approximate="tanh")
        o = F.linear(h, w2[e], b2[e])
        y.index_add_(0, token, o.float() * weights[token, slot, None])
    return y.to(x.dtype)


def grouped_mm_moe(x, weights, indices, w1_t, b1, w2_t, b2):
    """Tokens sorted by expert (a permuted copy of x), two torch._grouped_mm calls, index_add
    combine; w1_t [E, K, H] and w2_t [E, H, N] are transposed views. No host sync."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    expert = flat[order]
    counts = torch.zeros(w1_t.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.gelu(torch._grouped_mm(x[token], w1_t, offs=offs) + b1[expert], approximate="tanh")
    o = torch._grouped_mm(h, w2_t, offs=offs) + b2[expert]
    y = torch.zeros(x.shape[0], w2_t.shape[2], dtype=torch.float32, device=x.device)
    y.index_add_(0, token, o.float() * weights.reshape(-1)[order, None])
    return y.to(x.dtype)


def _routing(M, generator):
    logits = torch.randn(M, E, device="cuda", generator=generator)
    top, indices = torch.topk(logits, TOP_K, dim=-1)
    return torch.softmax(top, dim=-1), indices.to(torch.int32)


def _extra_memory_mib(fn) -> float:
    """Peak memory fn allocates beyond what it returns."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()) / 2 ** 20


def _expert_cases(sizes, generator) -> list[Case]:
    w1 = torch.randn(E, H, K, device="cuda", dtype=DTYPE, generator=generator) * K ** -0.5
    w2 = torch.randn(E, N, H, device="cuda", dtype=DTYPE, generator=generator) * H ** -0.5
    b1 = torch.randn(E, H, device="cuda", dtype=DTYPE, generator=generator) * 0.1
    b2 = torch.randn(E, N, device="cuda", dtype=DTYPE, generator=generator) * 0.1
    weight_bytes = (w1.numel() + w2.numel() + b1.numel() + b2.numel()) * 2
    compiled_loop = torch.compile(torch_loop, dynamic=False)
    cases = []
    for M in sizes:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE, generator=generator)
        weights, indices = _routing(M, generator)
        args = (x, weights, indices, w1, b1, w2, b2)
        shape = {"M": M, "K": K, "H": H, "N": N, "E": E, "k": TOP_K}
        # only the experts that receive a token must be read (at M=1, k of the E)
        used = indices.unique().numel()
        nbytes = weight_bytes * used // E + M * K * 2 + M * TOP_K * 8 + M * N * 2
        flops = 2 * M * TOP_K * (K * H + H * N)
        fused = lambda args=args: fused_ops.moe_experts(*args, activation="gelu_tanh")  # noqa: E731
        print(f"  moe_experts M={M}: {_extra_memory_mib(fused):.1f} MiB beyond inputs and y "
              f"(h + slot outputs: {M * TOP_K * (H + N) * 2 / 2 ** 20:.1f} MiB)")
        capturable = {"fused_ops": fused}
        if hasattr(torch, "_grouped_mm"):
            t_args = (x, weights, indices, w1.transpose(1, 2), b1, w2.transpose(1, 2), b2)
            capturable["torch._grouped_mm"] = lambda t_args=t_args: grouped_mm_moe(*t_args)
        cases.append(Case("moe_experts", shape, DTYPE, nbytes, flops, capturable, graph=M <= GRAPH_MAX_M))
        cases.append(Case("moe_experts", shape, DTYPE, nbytes, flops, {
            "torch loop": lambda args=args: torch_loop(*args),
            "torch.compile(loop)": lambda args=args: compiled_loop(*args),
        }))
    return cases


def _fusemoe_case(M, generator) -> list[Case]:
    """The whole forward (LayerNorm router + experts): triton backend vs the torch backend."""
    config = fused_ops.FuseMoEConfig()
    triton_moe = fused_ops.FuseMoE(config, backend="triton", device="cuda", dtype=DTYPE)
    torch_moe = fused_ops.FuseMoE(config, backend="torch", device="cuda", dtype=DTYPE)
    torch_moe.load_state_dict(triton_moe.state_dict())
    x = torch.randn(M, config.d_in, device="cuda", dtype=DTYPE, generator=generator)
    params = sum(p.numel() for p in triton_moe.parameters()) * 2
    nbytes = params + M * config.d_in * 2 + M * config.d_out * 2
    flops = 2 * M * config.top_k * (config.d_in * config.d_hidden + config.d_hidden * config.d_out) \
        + 2 * M * config.d_in * config.num_experts
    shape = {"M": M, "K": config.d_in, "H": config.d_hidden, "N": config.d_out, "E": config.num_experts,
             "k": config.top_k}
    return [
        Case("fusemoe_forward", shape, DTYPE, nbytes, flops, {"fused_ops": lambda: triton_moe(x)}, graph=True),
        Case("fusemoe_forward", shape, DTYPE, nbytes, flops, {"FuseMoE torch backend": lambda: torch_moe(x)}),
    ]


def cases(quick: bool = False) -> list[Case]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    sizes = [32, 8192] if quick else [1, 32, 256, 2048, 8192]
    return _expert_cases(sizes, generator) + _fusemoe_case(32, generator)


PLOTS = [("moe_experts", "M")]
