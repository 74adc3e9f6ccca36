"""MaxSim with the similarity tile transposed: S^T = chunk @ Q^T, the chunk's tokens on the M side
of the tensor-core instruction and the query rows on its N side. The shipped kernel's wgmma is
m64 x n(BLOCK_D = 64) with both operands read from shared memory for every 64-row slice, which
asks shared memory for its whole bandwidth at the tensor cores' rate (Nsight Compute: 71% of its
peak, the tensor pipe at 62%; maxsim_ncu_shipped.txt). Transposed, one instruction is
m64 x n(BLOCK_Q), up to 256, so each chunk is read from shared memory once per warpgroup and the
bytes per FLOP fall by a quarter to three eighths. The row maxima then run across the M side,
so each trip keeps an elementwise running maximum [BLOCK_D, BLOCK_Q] and reduces it over the
tokens once per document.

    python -m perf.maxsim_transposed offline      (no GPU: registers and the loop's instructions, sm_90)
    python -m perf.maxsim_transposed              (CUDA machine: times against the shipped kernel)
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

from perf.maxsim_tiles import SHAPES, shape_inputs
from perf.variants import edited_module

maxsim = importlib.import_module("fused_ops.maxsim")

# (block_q, block_d, warps, stages) of the transposed kernel: block_q is the instruction's N side
TILINGS = [(256, 64, 8, 3), (128, 64, 4, 3), (256, 64, 4, 3), (256, 64, 8, 4), (128, 128, 8, 3), (256, 128, 8, 2)]
ROUNDS = 3

EDITS = [
    ("    for _step in range(0, n_chunks):\n",
     "    run = tl.full([BLOCK_D, BLOCK_Q], float(\"-inf\"), tl.float32)     # [token, row]: the max so far\n"
     "    for _step in range(0, n_chunks):\n"),
    ("            sim = tl.dot(q, tl.trans(chunk), input_precision=PRECISION)\n"
     "        m = tl.maximum(m, tl.where(length > 0, tl.max(sim, axis=1), float(\"-inf\")))\n"
     "        last = length <= BLOCK_D\n"
     "        if last:                                                # add up the document's rows per query\n",
     "            sim = tl.dot(chunk, tl.trans(q), input_precision=PRECISION)\n"
     "        run = tl.maximum(run, sim)\n"
     "        last = length <= BLOCK_D\n"
     "        if last:                                                # add up the document's rows per query\n"
     "            m = tl.where(length > 0, tl.max(run, axis=0), float(\"-inf\"))\n"
     "            run = tl.full([BLOCK_D, BLOCK_Q], float(\"-inf\"), tl.float32)\n"),
]


def transposed():
    return edited_module(maxsim, EDITS, "transposed")


def offline() -> None:
    from fused_ops import offline as off
    import triton
    variant = transposed()
    print(f"triton {triton.__version__}, sm_90")
    for build in maxsim.offline_builds():
        scored = build.name.startswith("maxsim_bf16_d128_scores_")
        if not scored or not any(tag in build.name for tag in ("w8_s3", "w4_s3")):
            continue
        for name, kernel in (("shipped", maxsim.maxsim_kernel), ("transposed", variant.maxsim_kernel)):
            b = dataclasses.replace(build, kernel=kernel)
            report = off.compile_build(b, 90)
            loop = off.loop_opcodes(b, 90)
            print(f"{build.name} {name}: {report.registers} registers, {report.shared} shared, "
                  f"spills {report.loop_spills}, {sum(loop.values())} instructions a trip: {loop.most_common(8)}",
                  flush=True)


def main() -> None:
    import torch
    import triton
    from triton.testing import do_bench
    variant = transposed()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, shape in SHAPES.items():
        Q, D, lengths, flops = shape_inputs(shape)
        n_queries, q_tokens, n_docs, _, _, _, dim = shape
        shipped = maxsim.pick_config(n_queries, q_tokens, n_docs, dim, torch.bfloat16, Q.device)
        print(f"{name}: shipped {shipped}", flush=True)
        reference = maxsim.launch_maxsim(Q, D, None, lengths, "sum", shipped)
        contenders = [("shipped", maxsim, shipped)]
        for tiling in TILINGS:
            config = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, torch.bfloat16,
                                          *maxsim._device_limits(Q.device), tiling=maxsim.Tiling(*tiling))
            contenders.append((f"transposed {tiling}", variant, config))
        times = {}
        for round_ in range(ROUNDS):
            order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
            for label, module, config in order:
                try:
                    scores = module.launch_maxsim(Q, D, None, lengths, "sum", config)
                except Exception as exc:                  # a tiling that does not build or fit
                    times[label] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
                    continue
                diff = ((scores - reference).abs() / reference.abs().clamp_min(1e-3)).max().item()
                assert diff < 1e-4, (name, label, diff)
                ms = do_bench(lambda: module.launch_maxsim(Q, D, None, lengths, "sum", config), rep=100)
                times.setdefault(label, []).append(ms)
        for label, ms_list in times.items():
            if isinstance(ms_list, str):
                print(f"  {label:<32} {ms_list}")
                continue
            ms = sorted(ms_list)[len(ms_list) // 2]
            print(f"  {label:<32} {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})", flush=True)


if __name__ == "__main__":
    offline() if sys.argv[1:] == ["offline"] else main()
