"""layernorm_linear at 8192 x 8320 x 4096 (bf16) against cuBLAS F.linear alone and F.layer_norm +
F.linear, in alternating rounds whose order rotates (the H200's clocks fall under sustained GEMM
load, and by how much depends on what ran before): the shipped path (row-statistics pass + folded
gemm) at the tuned config and at the built-in fallback; the pass runs beside the gemm where an SM
holds a tile and a statistics program at once (the 128 x 256 tile tuned on both Hoppers), else before it
(the tuned tile is also timed with the pass first). Prints each contender's median, best and every round.

    python -m perf.ln_vs_cublas        (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
import triton

from fused_ops import tuning
from perf.harness import print_rounds, rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")

M, K, N = 8192, 8320, 4096
ROUNDS = 11


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K), rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    y = torch.empty((M, N), dtype=x.dtype, device="cuda")
    tuned = LN.pick_gemm_config(M, x.dtype, x.device)
    fallback = LN.gemm_fallback(LN.gemm_bucket(M), tuning.current_device()[1])
    contenders = {
        f"fused_ops tuned {tuned.block_m}x{tuned.block_n}": lambda: LN._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, tuned),
        "tuned, statistics pass first": lambda: LN._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, tuned,
                                                                beside=False),
        f"fused_ops fallback {fallback.block_m}x{fallback.block_n}":
            lambda: LN._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, fallback),
        "cublas F.linear": lambda: F.linear(x, w, bias),
        "F.layer_norm + F.linear": lambda: F.linear(F.layer_norm(x, (K,), gamma, beta, 1e-5), w, bias),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"tuned {tuned}; fallback {fallback}")
    print_rounds(rotated_rounds(contenders, ROUNDS), "cublas F.linear", "cuBLAS's median")


if __name__ == "__main__":
    main()
