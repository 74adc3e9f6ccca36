"""The raw-dot router's shared-memory slot race, with and without its fix (router.wait_for_dot).

x [M, 8320] bf16 feeds both the tl.dot (an asynchronous wgmma on sm_90) and the row sums; triton
3.6 gives x's tile STAGES - 1 shared-memory slots, so the load issued in step i (for step
i + STAGES - 1) rewrites the slot that step i's dot may still be reading. 'fixed' is the shipped
kernel (WAIT_DOT on sm_90: the wait becomes immediate), 'unfixed' the same with WAIT_DOT off.
Part 1 runs 64-row blocks at 8 warps with and without K slices, three launches each, against the
float64 reference (max |weights - reference|) and against each other (same bits?). Part 2 times,
in alternated rounds of CUDA-graph replays, the 64-row unsliced tiling both ways at M=8192, K
slices (fixed) at M=256 and 2048 in 32- and 64-row blocks, and the shipped tiling.

    python -m perf.router_slot_race [rounds]        (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import triton

from fused_ops import reference
from perf.harness import graph_time_ms
from perf.variants import edited_module

router = importlib.import_module("fused_ops.router")
K, E, TOP_K = 8320, 8, 4
NO_WAIT = ('    return family == "sm_90"\n', "    return False\n")     # router.wait_for_dot


def inputs(M):
    g = torch.Generator(device="cuda").manual_seed(M)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    return rand(M, K), rand(K), rand(K), rand(E, K, scale=K ** -0.5), rand(E)


def tiling(module, rows, splits):
    """The raw dot in `rows`-row blocks, 8 warps, 4 stages, K in `splits` slices."""
    return module.make_config(E, K, module.RouterTiling(True, rows, 128, 8, 4, splits))


def run(module, args, config):
    return module.launch_fused_router(*args, TOP_K, 1.0, 0.01, 1e-5, False, "softmax", config=config)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    modules = {"fixed": router, "unfixed": edited_module(router, [NO_WAIT], "unfixed")}
    print("## part 1: 64-row blocks, 8 warps; max |weights - float64 reference|, same bits over 3 launches")
    for M in (2048, 4097, 8192):
        args = inputs(M)
        want, _ = reference.fused_router(*(t.double() for t in args), k=TOP_K, alpha=0.01)
        for splits, stages in ((1, 6), (2, 6), (4, 4), (16, 6)):
            for name, module in modules.items():
                config = module.make_config(E, K, module.RouterTiling(True, 64, 128, 8, stages, splits))
                runs = [run(module, args, config) for _ in range(3)]
                worst = max((w.double() - want).abs().max().item() for w, _ in runs)
                same = all(torch.equal(w, runs[0][0]) and torch.equal(i, runs[0][1]) for w, i in runs)
                print(f"M={M} splits={splits} stages={stages} {name:8s} maxdiff {worst:.2e} same-bits {same}",
                      flush=True)
    print(f"## part 2: CUDA-graph us per call, {rounds} alternated rounds (median)")
    cases = {}
    for M, tilings in ((256, [(32, 16), (64, 4), (64, 16)]), (2048, [(64, 1), (64, 2), (64, 4), (64, 16)]),
                       (8192, [(64, 1)])):
        args = inputs(M)
        for rows, splits in tilings:
            cases[f"M={M} {rows}-row x{splits} fixed"] = (router, args, tiling(router, rows, splits))
        if M == 8192:
            cases[f"M={M} 64-row x1 unfixed"] = (modules["unfixed"], args, tiling(modules["unfixed"], 64, 1))
        shipped = router.pick_config(M, E, K, args[0], True)
        name = f"M={M} shipped {shipped['BLOCK_M']}-row x{shipped['SPLITS']} s{shipped['STAGES']}"
        cases[name] = (router, args, shipped)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (module, args, config) in cases.items():
            times[name].append(graph_time_ms(lambda: run(module, args, config)) * 1e3)
    for name, values in times.items():
        rounds_text = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:34s} {sorted(values)[len(values) // 2]:8.2f} us  (rounds: {rounds_text})")


if __name__ == "__main__":
    main()
