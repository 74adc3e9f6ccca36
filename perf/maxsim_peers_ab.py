"""MaxSim against the peer kernels on the two compute-bound shapes (ColPali: Nq=1, Lq=1024, Nd=1000,
Ld=1030; batch: Nq=16, Lq=32, Nd=10k, real lengths 100..300), bf16, d=128, with the sweep's own
cases (perf/bench_maxsim.py: same inputs, peers vetted in a child process first). Rounds
alternate the providers (clocks fall under sustained load); each round takes an eager time
(do_bench, L2 flushed; fused_ops' eager call includes the contract's host-side range check) and a
CUDA-graph time. Medians over rounds.

    python -m perf.maxsim_peers_ab [rounds]        (CUDA machine; peers importable)
"""
from __future__ import annotations

import sys

import torch
import triton

from perf import bench_maxsim
from perf.harness import graph_time_ms, time_ms

CASES = [("colpali", (1, 1024, 1000, 1030, 1030, 1030)), ("nq16", (16, 32, 10_000, 300, 100, 300))]
PROVIDERS = ("fused_ops", "flash-maxsim", "late-interaction-kernels")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    for name, shape in CASES:
        case = bench_maxsim._case("maxsim", *shape)
        runs = {p: case.providers[p] for p in PROVIDERS if p in case.providers}
        for p, fn in list(runs.items()):
            try:
                fn()
            except RuntimeError as exc:                        # not vetted: say why, leave it out
                print(f"{name} {p}: {exc}")
                del runs[p]
        eager = {p: [] for p in runs}
        graph = {p: [] for p in runs}
        for _ in range(rounds):
            for p, fn in runs.items():
                eager[p].append(time_ms(fn))
                graph[p].append(graph_time_ms(fn))
        for p in runs:
            print(f"{name} {p:<26} eager {median(eager[p]):.4f} ms  graph {median(graph[p]):.4f} ms  "
                  f"({case.flops / median(graph[p]) / 1e9:.0f} TFLOP/s graph; rounds eager "
                  f"{' '.join(f'{t:.3f}' for t in eager[p])}, graph {' '.join(f'{t:.3f}' for t in graph[p])})",
                  flush=True)


if __name__ == "__main__":
    main()
