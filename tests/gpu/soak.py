"""Soak: FuseMoE forward many times with varying batch sizes, and maxsim with varying lengths.
Checks that allocated GPU memory does not grow and that repeated inputs give bitwise-equal results.
Every batch size runs once before the baseline; after that, allocated memory may move only within
the bounded caches (launch plans: at most MAX_PLANS per kernel, the few-row ones holding a few KB
of split-K scratch each), CACHE_SLACK in all; a leak of one batch's buffers is megabytes.

    python tests/gpu/soak.py [iterations]
"""
import sys

import torch

import fused_ops
from fused_ops import FuseMoE, FuseMoEConfig

MAX_BATCH = 2048
CACHE_SLACK = 1 << 20       # bytes


def main(iterations: int = 10_000) -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    config = FuseMoEConfig(d_in=1024, d_hidden=512, d_out=256, num_experts=8, top_k=4)
    model = FuseMoE(config, device=dev, dtype=dt)
    probe_x = torch.randn(77, config.d_in, device=dev, dtype=dt)
    Q = torch.randn(4, 32, 128, device=dev, dtype=dt)
    D = torch.randn(2000, 128, 128, device=dev, dtype=dt)
    probe_len = torch.randint(0, 129, (2000,), device=dev)
    with torch.inference_mode():
        y0 = model(probe_x)
        s0 = fused_ops.maxsim(Q, D, d_lengths=probe_len)
        for m in range(1, MAX_BATCH + 1):                     # every plan and cache size once
            model(torch.randn(m, config.d_in, device=dev, dtype=dt))
        torch.cuda.synchronize()
        baseline = None
        changed = 0
        for it in range(iterations):
            m = int(torch.randint(1, MAX_BATCH + 1, (1,)))
            model(torch.randn(m, config.d_in, device=dev, dtype=dt))
            lengths = torch.randint(0, 129, (2000,), device=dev)
            fused_ops.maxsim(Q, D, d_lengths=lengths)
            if it % 500 == 0:
                changed += int(not torch.equal(model(probe_x), y0))
                changed += int(not torch.equal(fused_ops.maxsim(Q, D, d_lengths=probe_len), s0))
                torch.cuda.synchronize()
                allocated = torch.cuda.memory_allocated()
                baseline = allocated if baseline is None else baseline
                print(f"iteration {it:>6}: allocated {allocated / 2**20:.1f} MiB (start {baseline / 2**20:.1f})")
        torch.cuda.synchronize()
        growth = torch.cuda.memory_allocated() - baseline
    print(f"soak: {iterations} iterations, memory growth {growth} B, results changed {changed} times")
    if growth > CACHE_SLACK or changed:
        raise SystemExit("soak FAILED")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
