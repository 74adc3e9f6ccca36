"""Where the compute-bound shapes' time goes (batch: Nq=16, Lq=32, Nd=10000, real lengths 100..300;
ColPali: Nq=1, Lq=1024, Nd=1000, Ld=1030; bf16, d=128), by time differences: each variant changes one thing, and the rounds alternate and rotate.

- base:     the shipped kernel: past a document's end a chunk's rows repeat its last token, so S
            takes no mask.
- masked:   rows past the end read as zeros and S's columns there set to -inf before the row max
            (the kernel before clamped rows): what the per-element select costs.
- len64:    every length rounded down to a whole number of 64-token chunks (>= 64): the time per
            chunk without a part-filled last chunk per document.

    python -m perf.maxsim_chunk_cost [rounds]          (CUDA machine)
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

import torch
import triton
from triton.testing import do_bench

from fused_ops import offline
from fused_ops.tunables import _maxsim_inputs
from perf.variants import edited_module

maxsim = importlib.import_module("fused_ops.maxsim")

SHAPES = {"nq16": (16, 32, 10000, 300, 100, 300, 128), "colpali": (1, 1024, 1000, 1030, 1030, 1030, 128)}
# the kernel's clamped rows, and the masked columns they replaced
MASKED = [
    ("token = tl.minimum(t_off, length - 1)", "token = t_off\n        real = t_off < length"),
    ("mask=mask, other=0.0)", "mask=real[:, None] & (k_off[None, :] < DIM), other=0.0)"),
    ('m = tl.maximum(m, tl.where(length > 0, tl.max(sim, axis=1), float("-inf")))',
     'm = tl.maximum(m, tl.max(tl.where(real[None, :], sim, float("-inf")), axis=1))'),
]


def loop_opcodes(kernel):
    """Opcode counts of one chunk-loop trip of the batch shape's build (128 x 64 tile, 4 warps, 3
    stages, 4 queries per block, padded D) for sm_90."""
    build = next(b for b in maxsim.offline_builds() if b.name == "maxsim_bf16_d128_scores_q8_BQ128_BD64_w4_s3")
    constexprs = {**build.constexprs, "QPB_PAD": 4, "PACKED": False, "HAS_Q_LEN": False}
    return offline.loop_opcodes(dataclasses.replace(build, kernel=kernel, constexprs=constexprs), 90)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    masked = edited_module(maxsim, MASKED, "masked")     # masked columns instead of clamped rows
    for name, module in (("base", maxsim), ("masked", masked)):
        opcodes = loop_opcodes(module.maxsim_kernel)
        print(f"{name}: {sum(opcodes.values())} instructions per chunk-loop trip (sm_90): "
              + ", ".join(f"{op} {n}" for op, n in opcodes.most_common(8)), flush=True)
    for shape_name, shape in SHAPES.items():
        _maxsim_inputs.cache_clear()
        Q, D, lengths = _maxsim_inputs(*shape)
        n_queries, q_tokens, n_docs, _, _, _, dim = shape
        config = maxsim.pick_config(n_queries, q_tokens, n_docs, dim, Q.dtype, Q.device)
        print(f"{shape_name}: {config}", flush=True)
        variants = {"base": (maxsim.launch_maxsim, lengths), "masked": (masked.launch_maxsim, lengths),
                    "len64": (maxsim.launch_maxsim, (lengths // 64 * 64).clamp_min(64))}
        first = {}
        for name, (launch, lens) in variants.items():
            scores = launch(Q, D, None, lens, "sum", config)
            expected = first.setdefault(lens.data_ptr(), scores)
            diff = ((scores - expected).abs() / expected.abs().clamp_min(1e-6)).max().item()
            assert diff < 1e-5, (shape_name, name, diff)
        times = {name: [] for name in variants}
        for r in range(rounds):
            names = list(variants)
            for name in names[r % len(names):] + names[:r % len(names)]:
                launch, lens = variants[name]
                times[name].append(do_bench(lambda: launch(Q, D, None, lens, "sum", config), rep=200))
        for name, (_, lens) in variants.items():
            ms = sorted(times[name])[len(times[name]) // 2]
            chunks = torch.where(lens > 0, (lens + 63) // 64, 1).sum().item() * maxsim._Rows.of(
                config.block_q, n_queries, q_tokens).n_blocks
            flops = 2 * n_queries * q_tokens * lens.sum().item() * dim
            print(f"{shape_name} {name:7s} {ms:.4f} ms  {ms / chunks * 1e6:.2f} ns per 64-token chunk and row block  "
                  f"{flops / ms / 1e9:.0f} TFLOP/s on real tokens  (rounds: {' '.join(f'{t:.4f}' for t in times[name])})",
                  flush=True)


if __name__ == "__main__":
    main()
