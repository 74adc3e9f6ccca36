"""layernorm_linear's row-statistics pass at 8192 x 8320 (bf16): the shipped row_stats_kernel (the
pivot is the mean of the first tile, a cross-thread reduction before the pipelined loop starts)
against the same pass with each row's first value as the pivot (one load, no reduction: the loop's
loads go out at once), over a few tilings; torch's var_mean and a plain read (sum) beside them.
Each checked against the shipped kernel's mean and rstd; rounds whose order rotates.

    python -m perf.ln_stats_pivot        (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from perf.harness import print_rounds, rotated_rounds
from perf.ln_stats_pass import store_stats

LN = importlib.import_module("fused_ops.layernorm_linear")

M, K = 8192, 8320
ROUNDS = 7
TILINGS = [(2, 512, 2, 4), (4, 512, 4, 4), (1, 1024, 4, 4), (2, 1024, 4, 3), (8, 256, 4, 4)]  # rows, K, warps, stages


@triton.jit
def stats_first_value_kernel(x_ptr, stats_ptr, M, K, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             STAGES: tl.constexpr):
    """(mean, rstd) of each row, shifted by the row's first value (exact for a constant row: rstd 0)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = LN.row_starts(x_ptr, row, M, stride_x)
    pivot = tl.load(x_rows).to(tl.float32)
    lane = tl.arange(0, BLOCK_K)
    s1 = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    s2 = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        s1, s2 = LN.add_shifted_sums(x_rows, k0 + lane, K, pivot, s1, s2)
    store_stats(stats_ptr, row, M, K, eps, pivot, s1, s2)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(M, K, device="cuda", generator=g) + 3 * torch.randn(M, 1, device="cuda", generator=g)).bfloat16()
    shipped = torch.empty((2, M), device="cuda")
    LN.launch_row_stats(x, shipped, 1e-5)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; x {M} x {K} bf16 "
          f"({x.numel() * 2 / 1e6:.1f} MB); shipped: {LN.STATS_BLOCK_M} x {LN.STATS_BLOCK_K}, {LN.STATS_WARPS} warps, "
          f"{LN.STATS_STAGES} stages", flush=True)
    contenders = {"shipped row_stats_kernel": lambda: LN.launch_row_stats(x, torch.empty_like(shipped), 1e-5)}
    for bm, bk, warps, stages in TILINGS:
        out = torch.empty_like(shipped)

        def run(out=out, bm=bm, bk=bk, warps=warps, stages=stages):
            stats_first_value_kernel[(triton.cdiv(M, bm),)](x, out, M, K, x.stride(0), 1e-5, BLOCK_M=bm, BLOCK_K=bk,
                                                             STAGES=stages, num_warps=warps)
        run()
        scale = shipped.abs() + shipped[1:].abs()
        print(f"first value {bm}x{bk} w{warps} s{stages}: max difference from shipped / (|stat| + rstd) "
              f"{((out - shipped).abs() / scale).max().item():.1e}", flush=True)
        contenders[f"first value {bm}x{bk} w{warps} s{stages}"] = run
    contenders["torch var_mean"] = lambda: torch.var_mean(x, dim=1)
    contenders["torch sum (a plain read)"] = lambda: x.sum(dim=1)
    times = rotated_rounds(contenders, ROUNDS)
    print_rounds(times, "shipped row_stats_kernel", "shipped")
    for name, values in times.items():
        ms = sorted(values)[len(values) // 2]
        print(f"{name:<36} {x.numel() * 2 / ms / 1e9:.2f} TB/s read")


if __name__ == "__main__":
    main()
