"""Peak GPU memory that moe_experts allocates beyond its inputs and output y, against the hidden
activations and slot outputs it must hold (h [M k, H] and [M k, N] in x's dtype: O(M k H)) and
against the peers of bench_moe (the per-expert torch loop, torch._grouped_mm on sorted tokens).
Reference shape, bf16: K 8320, H 4096, N 1536, E 8, top-4.

    python -m perf.moe_memory [M ...]            (CUDA machine)
"""
import sys

import torch
import triton

import fused_ops
from perf.bench_moe import DTYPE, E, H, K, N, TOP_K, _extra_memory_mib, _routing, grouped_mm_moe, torch_loop


def main(sizes) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16 K {K} "
          f"H {H} N {N} E {E} top-{TOP_K}; MiB allocated at peak beyond the inputs and y")
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(E, H, K, device="cuda", dtype=DTYPE, generator=g) * K ** -0.5
    w2 = torch.randn(E, N, H, device="cuda", dtype=DTYPE, generator=g) * H ** -0.5
    b1 = torch.randn(E, H, device="cuda", dtype=DTYPE, generator=g) * 0.1
    b2 = torch.randn(E, N, device="cuda", dtype=DTYPE, generator=g) * 0.1
    print(f"{'M':>6} {'h + slot outputs':>17} {'moe_experts':>12} {'torch loop':>11} {'_grouped_mm':>12}")
    for M in sizes:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE, generator=g)
        weights, indices = _routing(M, g)
        args = (x, weights, indices, w1, b1, w2, b2)
        fused_ops.moe_experts(*args)                      # compile and plan outside the measurement
        fused = _extra_memory_mib(lambda: fused_ops.moe_experts(*args))
        loop = _extra_memory_mib(lambda: torch_loop(*args))
        grouped = "-"
        if hasattr(torch, "_grouped_mm"):
            t_args = (x, weights, indices, w1.transpose(1, 2), b1, w2.transpose(1, 2), b2)
            grouped = f"{_extra_memory_mib(lambda: grouped_mm_moe(*t_args)):.1f}"
        needed = M * TOP_K * (H + N) * 2 / 2 ** 20
        print(f"{M:>6} {needed:>17.1f} {fused:>12.1f} {loop:>11.1f} {grouped:>12}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 32, 256, 2048, 8192])
