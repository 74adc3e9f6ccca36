"""Documents per program on the scoring path, at the shipped tiling, on the two compute-bound shapes
(ColPali: Nq=1, Lq=1024, Nd=1000, Ld=1030; batch: Nq=16, Lq=32, Nd=10000, lengths 100..300), bf16,
d=128. Each program's work is its group's chunks, so the group sets how many rounds ("waves") of
programs the SMs run: a last round that is part full leaves SMs idle. Groups past SCORE_GROUP run
with a larger compile-time bound (GROUP=32), and group 16 is timed at both bounds to tell the two
apart. Rounds rotate; do_bench medians; scores checked against the shipped group's.

    python -m perf.maxsim_groups                                                  (CUDA machine)
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import triton
from triton.testing import do_bench

from perf.maxsim_tiles import SHAPES, shape_inputs

maxsim = importlib.import_module("fused_ops.maxsim")
GROUPS = {"colpali": [(3, 16), (4, 16), (5, 16), (6, 16), (2, 16), (8, 16)],
          "nq16": [(16, 16), (8, 16), (10, 16), (12, 16), (14, 16), (16, 32), (19, 32), (20, 32), (24, 32)]}
ROUNDS = 5


def _programs_per_sm(kernel) -> int:
    """Resident programs an SM holds for a compiled kernel (shared memory, registers, warps)."""
    props = torch.cuda.get_device_properties(0)
    by_smem = props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024)
    threads = 32 * kernel.metadata.num_warps
    by_regs = props.regs_per_multiprocessor // (threads * kernel.n_regs)
    return min(by_smem, by_regs, props.max_threads_per_multi_processor // threads)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shipped_bound = maxsim.SCORE_GROUP
    for name, shape in SHAPES.items():
        Q, D, lengths, flops = shape_inputs(shape)
        n_queries, q_tokens, n_docs, _, _, _, dim = shape
        shipped = maxsim.pick_config(n_queries, q_tokens, n_docs, dim, torch.bfloat16, Q.device)
        rows = maxsim._Rows.of(shipped.block_q, n_queries, q_tokens)
        print(f"{name}: shipped {shipped}; {rows.n_blocks} row blocks", flush=True)
        times, first = {}, None
        for _ in range(ROUNDS):
            for group, bound in GROUPS[name]:
                config = dataclasses.replace(shipped, group=group)
                maxsim.SCORE_GROUP = bound
                try:
                    scores = maxsim.launch_maxsim(Q, D, None, lengths, "sum", config)
                    ms = do_bench(lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", config), rep=100)
                finally:
                    maxsim.SCORE_GROUP = shipped_bound
                first = scores if first is None else first
                diff = ((scores - first).abs() / first.abs().clamp_min(1e-6)).max().item()
                assert diff < 1e-5, (name, group, diff)
                times.setdefault((group, bound), []).append(ms)
        builds = list(maxsim.maxsim_kernel.device_caches[0][0].values())
        slots = sms * min(_programs_per_sm(kernel) for kernel in builds)
        print(f"  {slots} program slots ({sms} SMs; builds' registers and shared bytes: "
              f"{[(kernel.n_regs, kernel.metadata.shared) for kernel in builds]})")
        for (group, bound), ms_list in times.items():
            ms = sorted(ms_list)[len(ms_list) // 2]
            programs = triton.cdiv(n_docs, group) * rows.n_blocks
            print(f"  group {group:>2} (bound {bound}): {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"{programs} programs = {programs / slots:.2f} rounds  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})", flush=True)


if __name__ == "__main__":
    main()
