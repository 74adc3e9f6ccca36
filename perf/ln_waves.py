"""layernorm_linear (bf16, K = 8320, N = 4096) and cuBLAS F.linear at row counts whose 128 x 256 tiles
fill 6.91, 7.76 (M = 8192) and 8.00 waves of the H200's 132 SMs, in rotated rounds: whether the
last, part-filled wave of the one-tile-per-program gemm costs a whole wave
(perf/results/NVIDIA_H200/ln_waves.txt).

    python -m perf.ln_waves [rounds]        (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
import triton

from perf.harness import rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")
K, N = 8320, 4096
ROWS = (7296, 8192, 8448)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    gamma, beta, w, bias = rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    config = LN.pick_gemm_config(8192, torch.bfloat16, torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    contenders = {}
    for m in ROWS:
        x = rand(m, K)
        y = torch.empty((m, N), dtype=x.dtype, device="cuda")
        waves = triton.cdiv(m, config.block_m) * triton.cdiv(N, config.block_n) / sms
        contenders[f"op M={m} ({waves:.2f} waves)"] = (
            lambda x, y: lambda: LN._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, config))(x, y)
        contenders[f"cuBLAS M={m}"] = (lambda x: lambda: F.linear(x, w, bias))(x)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {config}; "
          f"{rounds} rotated rounds, do_bench medians")
    for name, values in rotated_rounds(contenders, rounds).items():
        print(f"{name:<28} median {sorted(values)[len(values) // 2]:.4f} ms  "
              f"(rounds: {' '.join(f'{t:.3f}' for t in values)})")


if __name__ == "__main__":
    main()
