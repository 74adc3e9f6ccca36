"""layernorm_linear at 8192 x 8320 x 4096 (bf16): the folded gemm launched while the statistics pass
still runs (programmatic dependent launch: the pass lets it launch once every pass program has
started, and each gemm tile waits for the pass only before its epilogue) against the two launched
one after the other, cuBLAS F.linear alone beside them; rounds whose order rotates, each
contender's median, best and every round.

    python -m perf.ln_pdl        (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
import triton

from perf.harness import print_rounds, rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")

M, K, N = 8192, 8320, 4096
ROUNDS = 9


def launch(pdl: bool, *args) -> None:
    LN.PDL = pdl
    LN._launch_gemm(*args)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K), rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    cfg = LN.pick_gemm_config(M, x.dtype, x.device)
    outs = {}
    for pdl in (False, True):
        outs[pdl] = torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda")
        launch(pdl, x, gamma, beta, w, bias, outs[pdl], 1e-5, cfg)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {cfg}")
    print("same bits with and without PDL:", torch.equal(outs[False], outs[True]))
    y = outs[True]
    contenders = {
        "stats pass, then gemm": lambda: launch(False, x, gamma, beta, w, bias, y, 1e-5, cfg),
        "gemm launched during the pass": lambda: launch(True, x, gamma, beta, w, bias, y, 1e-5, cfg),
        "cublas F.linear": lambda: F.linear(x, w, bias),
    }
    print_rounds(rotated_rounds(contenders, ROUNDS), "cublas F.linear", "cuBLAS's median")
    LN.PDL = True


if __name__ == "__main__":
    main()
