"""layernorm_linear's 16-bit gemm at 8192 x 8320 x 4096 (bf16) with its row statistics taken two ways:
a separate pass over x before the gemm, or inside the gemm's K loop from the x tiles it loads
anyway; beside cuBLAS F.linear alone and F.layer_norm + F.linear. Rounds alternate (the clocks
fall under sustained GEMM load, for every contender alike); medians of do_bench.

    python -m perf.ln_stats_ab        (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

LN = importlib.import_module("fused_ops.layernorm_linear")

M, K, N = 8192, 8320, 4096
ROUNDS = 7


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K), rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    out = {name: torch.empty((M, N), dtype=x.dtype, device="cuda") for name in ("separate", "in-loop")}
    cfg = LN.pick_gemm_config(M, x.dtype, x.device)
    contenders = {
        "separate": lambda: LN._launch_gemm(x, gamma, beta, w, bias, out["separate"], 1e-5, cfg, stats_in_loop=False),
        "in-loop": lambda: LN._launch_gemm(x, gamma, beta, w, bias, out["in-loop"], 1e-5, cfg, stats_in_loop=True),
        "cublas F.linear": lambda: F.linear(x, w, bias),
        "F.layer_norm + F.linear": lambda: F.linear(F.layer_norm(x, (K,), gamma, beta, 1e-5), w, bias),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {cfg}")
    times = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, fn in contenders.items():
            times[name].append(do_bench(fn, rep=100))
    cublas = sorted(times["cublas F.linear"])[ROUNDS // 2]
    for name, ms_list in times.items():
        ms = sorted(ms_list)[ROUNDS // 2]
        print(f"{name:<24} median {ms:.4f} ms  {ms / cublas:.3f}x cuBLAS  {2 * M * N * K / ms / 1e9:.0f} TFLOP/s  "
              f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})")
    ref = F.linear(F.layer_norm(x[:256].double(), (K,), gamma.double(), beta.double(), 1e-5), w.double(), bias.double())
    for name in ("separate", "in-loop"):
        print(f"{name}: max |y - float64 reference| over 256 rows "
              f"{(out[name][:256].double() - ref).abs().max().item():.3e}")
    print("max |separate - in-loop|:", (out["separate"].float() - out["in-loop"].float()).abs().max().item())


if __name__ == "__main__":
    main()
