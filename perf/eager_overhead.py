"""CPU cost of eager calls at few rows: fused_router (FuseMoE's router, x [32, 8320] bf16, E=8, k=4)
and layernorm_linear (x [256 or 8, 8320] bf16, N=4096): wall microseconds per call in a tight
loop (synchronised once at the end), where the CPU, not the GPU, sets the pace unless the kernels
are longer. Prints the torch eager pipeline beside the pieces of our call.

    python -m perf.eager_overhead        (CUDA machine)
"""
from __future__ import annotations

import time

import torch
import triton

import importlib

import torch.nn.functional as F

import fused_ops
from fused_ops import reference, router

from .bench_router import ALPHA, E, K, TEMPERATURE, TOP_K, _params, torch_router

M = 32


def per_call_us(fn, calls: int = 3000, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def router_pieces() -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    g, b, w, wb = _params(E)
    params = (g, b, w, wb)
    call = (TOP_K, TEMPERATURE, ALPHA, 1e-5, False, "softmax")
    outputs = lambda: (torch.empty((M, TOP_K), dtype=torch.float32, device="cuda"),   # noqa: E731
                       torch.empty((M, TOP_K), dtype=torch.int32, device="cuda"))
    _, grid, args, kwargs = router._launch_fused(x, params, call, *outputs(), None)
    config = router.pick_config(M, E, K, x, router.raw_dot_ok(x, w))
    fused_ops.fused_router(x, *params, k=TOP_K, temperature=TEMPERATURE, alpha=ALPHA)          # builds the plan
    key = next(iter(router._PLANS._plans))
    plan = router._PLANS.find(key, params)
    pieces = {
        "torch eager pipeline": lambda: torch_router(x, *params),
        "fused_router (public, plan)": lambda: fused_ops.fused_router(x, *params, k=TOP_K, temperature=TEMPERATURE,
                                                                     alpha=ALPHA),
        "  argument checks": lambda: reference.check_fused_router(x, *params, TOP_K, TEMPERATURE, ALPHA, 1e-5,
                                                                  "softmax"),
        "  plan launch + 2 outputs": lambda: plan.launch(x, *outputs()),
        "  2 output allocations": outputs,
        "launcher without a plan": lambda: router.launch_fused_router(x, *params, *call, config=config),
        "  Triton jit launch alone": lambda: router.fused_router_kernel[grid](*args, **kwargs),
    }
    return {f"x [{M}, {K}] bf16, E={E}, k={TOP_K}": pieces}


def layernorm_linear_pieces(N: int = 4096) -> dict:
    """The 16-bit gemm path: at 256 rows the statistics pass and the gemm, at 8 the gemm split over K
    and its finish kernel."""
    LN = importlib.import_module("fused_ops.layernorm_linear")
    g, b, bias = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (K, K, N))
    w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    out = {}
    for rows in (256, 8):
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        out[f"x [{rows}, {K}] bf16, N={N}"] = {
            "torch eager pipeline": lambda x=x: F.linear(F.layer_norm(x, (K,), g, b), w, bias),
            "layernorm_linear (public, plans)": lambda x=x: fused_ops.layernorm_linear(x, g, b, w, bias),
            "the same, plans cleared each call": lambda x=x: ([t.clear() for t in LN.PLAN_TABLES],
                                                              fused_ops.layernorm_linear(x, g, b, w, bias)),
        }
    return out


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for case in (router_pieces, layernorm_linear_pieces):
        for title, pieces in case().items():
            print(title)
            for name, fn in pieces.items():
                print(f"  {name:32s} {per_call_us(fn):7.2f} us/call")


if __name__ == "__main__":
    main()
