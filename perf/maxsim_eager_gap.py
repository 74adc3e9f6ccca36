"""Where the eager ColPali call (Nq=1, Lq=1024, Nd=1000, Ld=1030, bf16, d=128) loses time to its CUDA
graph replay: the contract's lengths range check reads values on the host, a sync that leaves the GPU
idle for whatever host work follows it. Times (do_bench, as the sweep does) the whole op, the op
without lengths, the launch without checks, the checks alone and the config choice, and the host
microseconds of each piece with the GPU idle.

    python -m perf.maxsim_eager_gap        (CUDA machine)
"""
from __future__ import annotations

import cProfile
import importlib
import pstats
import time

import torch

import fused_ops
from fused_ops import reference

from .harness import environment, time_ms

maxsim = importlib.import_module("fused_ops.maxsim")    # the package's name `maxsim` is the op
NQ, LQ, ND, LD, DIM = 1, 1024, 1000, 1030, 128


def host_us(fn, calls: int = 200) -> float:
    """Median host microseconds of fn(), the GPU drained before each call."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    print(environment())
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = torch.randn(NQ, LQ, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    D = torch.randn(ND, LD, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.full((ND,), LD, device="cuda", dtype=torch.int64)
    offsets = torch.arange(ND + 1, device="cuda", dtype=torch.int64) * LD
    packed = D.view(-1, DIM)
    pieces = {
        "maxsim(d_lengths)": lambda: fused_ops.maxsim(Q, D, d_lengths=lengths),
        "maxsim(no lengths)": lambda: fused_ops.maxsim(Q, D),
        "maxsim_varlen": lambda: fused_ops.maxsim_varlen(Q, packed, offsets),
        "launch_maxsim (no checks)": lambda: maxsim.launch_maxsim(Q, D, None, lengths),
        "check_maxsim": lambda: reference.check_maxsim(Q, D, None, lengths, "sum"),
        "pick_config": lambda: maxsim.pick_config(NQ, LQ, ND, DIM, Q.dtype, Q.device),
    }
    for name, fn in pieces.items():
        fn()
        print(f"{name:28s} do_bench {time_ms(fn):8.4f} ms   host {host_us(fn):8.1f} us", flush=True)
    profile = cProfile.Profile()
    profile.runcall(host_us, pieces["maxsim(d_lengths)"])
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
