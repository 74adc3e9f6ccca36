"""layernorm_linear's 16-bit gemm path at M x 8320 x 4096 (bf16) with the row-statistics pass beside
the gemm (the library's order where an SM holds a gemm tile and a statistics program at once:
layernorm_linear.stats_beside) against the pass before the gemm, the gemm alone, and cuBLAS
F.linear, in rotated rounds of CUDA-graph replays (GPU time: an eager call at a few hundred rows is
bound by the CPU), for the device's tuned tile and, where that differs, the 128 x 256 tile (which
leaves room on sm_90).

Beside the gemm: one statistics program an SM walks the rows in order and counts each finished row
block in; the gemm is launched behind it with programmatic dependent launch (as soon as every
statistics program runs), and each tile waits for its row block's count before its epilogue.
Runs 1-4 in ln_stats_beside.txt come from this probe's first form, with its own kernels (commit
d64ed32), before the layout went into the library.

    python -m perf.ln_stats_beside [rounds] [M ...]      (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
import triton

from perf.harness import graphed, print_rounds, rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")
K, N = 8320, 4096
WIDE_TILE = LN.GemmConfig(128, 256, 64, 8, 8, 4)    # leaves an SM room for a statistics program on sm_90


def tile_name(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages}"


def contenders_at(M: int, g: torch.Generator) -> dict:
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K) + 3, rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    ref = F.linear(F.layer_norm(x.float(), (K,), gamma.float(), beta.float(), 1e-5), w.float(), bias.float())
    scale = ref.abs().max().item()
    sums, folded = LN.weight_sums(w, gamma, beta, bias)
    stats = torch.empty((2, M), dtype=torch.float32, device="cuda")
    tuned = LN.pick_gemm_config(M, x.dtype, x.device)
    contenders = {}
    for cfg in dict.fromkeys([tuned, WIDE_TILE]):
        name = f"M {M} {tile_name(cfg)}{' (tuned)' if cfg == tuned else ''}"
        fits = LN.stats_beside(x, folded, stats, sums, torch.empty_like(ref, dtype=x.dtype), 1e-5, cfg)
        print(f"{name}: the statistics program fits beside a tile: {fits}")
        for beside in (True, False):
            y = torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda")
            run = (lambda y, cfg, beside: lambda: LN._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, cfg,
                                                                    beside=beside))(y, cfg, beside)
            run()
            first = y.clone()
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            label = f"{name} {'beside' if beside else 'pass first'}"
            print(f"{label}: max err / max |y| {(y.float() - ref).abs().max().item() / scale:.2e}, "
                  f"same bits five calls later {torch.equal(y, first)}", flush=True)
            contenders[label] = graphed(run)
        y = torch.empty((M, N), dtype=x.dtype, device="cuda")
        contenders[f"{name} part: gemm alone"] = graphed(
            (lambda y, cfg: lambda: LN.launch_folded_gemm(x, folded, stats, sums, y, cfg))(y, cfg))
    contenders[f"M {M} part: statistics pass"] = graphed(lambda: LN.launch_row_stats(x, stats, 1e-5))
    counts = LN.beside_counts(M, tuned.block_m, x.device)
    contenders[f"M {M} part: statistics beside, alone"] = graphed(
        lambda: LN.launch_row_stats(x, stats, 1e-5, counts, tuned.block_m))
    contenders[f"M {M} cublas F.linear"] = graphed(lambda: F.linear(x, w, bias))
    return contenders


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    sizes = [int(a) for a in sys.argv[2:]] or [8192]
    g = torch.Generator(device="cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"K N = {K} {N} bf16, x ~ N(3, 1); {sms} SMs")
    for M in sizes:
        contenders = contenders_at(M, g)
        print_rounds(rotated_rounds(contenders, rounds), f"M {M} cublas F.linear", "cuBLAS")


if __name__ == "__main__":
    main()
