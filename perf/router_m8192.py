"""fused_router at M=8192 (x [8192, 8320] bf16, E=8, k=4) against its HBM read floor, in
alternated rounds: each round measures the read ceiling (as perf's sweeps do: a 4 GB float32 sum)
and then every tiling, CUDA-graph replays (no host work); the fraction of the floor is taken per
round, and medians are printed. Tilings: the shipped one for this device and neighbours of it
(rows per program, K slices, stages). Each tiling's top-k indices must match the shipped one's
(weights within 1e-3, indices in all but 0.1% of rows: another summation order may swap near-ties).

    python -m perf.router_m8192 [rounds]        (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import triton

from perf.harness import graph_time_ms, time_ms

router = importlib.import_module("fused_ops.router")
M, K, E, TOP_K = 8192, 8320, 8, 4
TILINGS = [router.RouterTiling(True, bm, 128, 8, stages, splits)
           for bm, stages, splits in ((64, 6, 1), (64, 4, 1), (32, 6, 1), (32, 4, 1), (32, 6, 2), (128, 4, 1))]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, wb = rand(M, K), rand(K), rand(K), rand(E, K, scale=K ** -0.5), rand(E)
    nbytes = (M * K + E * K + 2 * K + E) * 2 + M * TOP_K * 8          # as perf/bench_router.py counts
    call = (TOP_K, 1.0, 0.01, 1e-5, False, "softmax")
    shipped = router.pick_config(M, E, K, x, True)
    configs = {"shipped": shipped, **{str(t): router.make_config(E, K, t) for t in TILINGS}}
    print(f"shipped config: {shipped}")
    want_w, want_i = router.launch_fused_router(x, gamma, beta, w, wb, *call)
    for name, cfg in configs.items():        # other K slices sum in another order: near-ties may swap
        got_w, got_i = router.launch_fused_router(x, gamma, beta, w, wb, *call, config=cfg)
        swapped = (got_i != want_i).any(dim=1).float().mean().item()
        diff = (got_w - want_w).abs().max().item()
        print(f"{name}: weights differ by up to {diff:.1e}, {swapped:.1e} of the rows' indices differ")
        assert diff < 1e-3 and swapped < 1e-3, name
    big = torch.randn(1 << 30, device="cuda", dtype=torch.float32)
    fractions = {name: [] for name in configs}
    times = {name: [] for name in configs}
    ceilings = []
    for _ in range(rounds):
        read_gb_s = big.numel() * 4 / (time_ms(lambda: big.sum(), rep=50) * 1e-3) / 1e9
        ceilings.append(read_gb_s)
        floor_ms = nbytes / (read_gb_s * 1e9) * 1e3
        for name, cfg in configs.items():
            ms = graph_time_ms(lambda cfg=cfg: router.launch_fused_router(x, gamma, beta, w, wb, *call, config=cfg))
            times[name].append(ms)
            fractions[name].append(floor_ms / ms)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"read ceiling: median {median(ceilings):.0f} GB/s (rounds: {' '.join(f'{c:.0f}' for c in ceilings)}); "
          f"floor at the median {nbytes / median(ceilings) / 1e3:.2f} us")
    for name in configs:
        print(f"{name:<70} median {median(times[name]) * 1e3:6.2f} us  {median(fractions[name]):.3f} of floor  "
              f"(rounds: {' '.join(f'{f:.3f}' for f in fractions[name])})", flush=True)


if __name__ == "__main__":
    main()
