"""MaxSim with documents cut into half-chunks: each 64-token chunk is two 32-token halves, which may
belong to two documents, against the shipped kernel (one document a chunk), on the two
compute-bound shapes (perf/maxsim_tiles.py's), in rotated rounds.

A document's tokens round up to whole halves instead of whole chunks: for lengths uniform in
100..300 a document takes about 216 token rows of work instead of 231. The halves interleave in the
chunk, so each half's maximum is a max over one of S's column pairs (tl.split), no mask (a half
past its document's end repeats the document's last token, as the shipped chunk does). Scoring
path only: padded D, sum, 16-bit.

    python -m perf.maxsim_halves [rounds] [block_q,block_d,warps,stages ...]      (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import triton
import triton.language as tl

from fused_ops.tunables import _maxsim_inputs
from perf.harness import rotated_rounds

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPES = {"nq16": (16, 32, 10000, 300, 100, 300, 128), "colpali": (1, 1024, 1000, 1030, 1030, 1030, 128)}


@triton.jit
def _advance(n, pos, left, len_ptr, n_end, n_tokens, HALF: tl.constexpr):
    """(document, row, tokens left) after one half-chunk; whether that half ended its document."""
    ends = left <= HALF
    n += ends.to(tl.int32)
    next_left = tl.load(len_ptr + n, mask=n < n_end, other=0).to(tl.int32)
    return n, tl.where(ends, n * n_tokens, pos + HALF), tl.where(ends, next_left, left - HALF), ends


@triton.jit
def maxsim_halves_kernel(q_ptr, d_ptr, len_ptr, out_ptr, n_queries, n_docs, q_tokens, n_tokens, lq_tile, qpb,
                         n_splits, group, DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                         QPB_PAD: tl.constexpr, GROUP: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    n_blocks = tl.cdiv(n_queries, qpb) * n_splits
    block = tl.program_id(0) % n_blocks
    dg = tl.program_id(0) // n_blocks
    qg = block // n_splits
    split = block % n_splits
    r = tl.arange(0, BLOCK_Q)
    j = r // lq_tile
    query_r = qg * qpb + j
    tok_q = split * lq_tile + r - j * lq_tile
    row_ok = (j < qpb) & (query_r < n_queries) & (tok_q < q_tokens)
    k_off = tl.arange(0, DIM)
    q = tl.load(q_ptr + (query_r.to(tl.int64) * q_tokens + tok_q)[:, None] * DIM + k_off[None, :],
                mask=row_ok[:, None], other=0.0)

    n0 = dg * group
    n_end = tl.minimum(n_docs, n0 + group)
    col = tl.arange(0, GROUP)
    live_doc = col < n_end - n0
    len_all = tl.load(len_ptr + n0 + col, mask=live_doc, other=0).to(tl.int32)
    n_halves = tl.sum(tl.where(live_doc, tl.maximum(tl.cdiv(len_all, HALF), 1), 0), axis=0)

    # chunk row 2i is token i of the first half, row 2i + 1 token i of the second: S's column pairs
    # are a thread's register pairs, so tl.split parts the halves without moving data
    t = tl.arange(0, BLOCK_D) // 2
    upper = tl.arange(0, BLOCK_D) % 2 == 1
    n_a = n0                                                    # the first half's document, row, tokens left
    pos_a = n_a * n_tokens
    left_a = tl.load(len_ptr + n_a).to(tl.int32)
    n_b, pos_b, left_b, _ = _advance(n_a, pos_a, left_a, len_ptr, n_end, n_tokens, HALF)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    acc_rows = tl.zeros([BLOCK_Q, GROUP], tl.float32)
    for _step in range(0, tl.cdiv(n_halves, 2)):
        row = tl.where(upper, pos_b + tl.minimum(t, left_b - 1), pos_a + tl.minimum(t, left_a - 1))
        present = tl.where(upper, left_b, left_a) > 0
        chunk = tl.load(d_ptr + row.to(tl.int64)[:, None] * DIM + k_off[None, :], mask=present[:, None], other=0.0)
        sim = tl.dot(q, tl.trans(chunk))
        sim_a, sim_b = tl.split(tl.reshape(sim, [BLOCK_Q, HALF, 2]))
        max_a = tl.max(sim_a, axis=1)
        max_b = tl.max(sim_b, axis=1)
        m = tl.maximum(m, tl.where(left_a > 0, max_a, float("-inf")))
        if left_a <= HALF:                                      # the first half ends its document
            acc_rows = tl.where(col[None, :] == n_a - n0, m[:, None], acc_rows)
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        m = tl.maximum(m, tl.where(left_b > 0, max_b, float("-inf")))
        if left_b <= HALF:
            acc_rows = tl.where(col[None, :] == n_b - n0, m[:, None], acc_rows)
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        n_a, pos_a, left_a, _ = _advance(n_b, pos_b, left_b, len_ptr, n_end, n_tokens, HALF)
        n_b, pos_b, left_b, _ = _advance(n_a, pos_a, left_a, len_ptr, n_end, n_tokens, HALF)

    jq = tl.arange(0, QPB_PAD)
    acc = tl.zeros([QPB_PAD, GROUP], tl.float32)
    for jj in tl.static_range(QPB_PAD):
        sums = tl.sum(tl.where(((j == jj) & row_ok)[:, None], acc_rows, 0.0), axis=0)
        acc = tl.where(jq[:, None] == jj, sums[None, :], acc)
    query_q = qg * qpb + jq
    live_q = (jq < qpb) & (query_q < n_queries)
    out_ptr += split.to(tl.int64) * n_queries * n_docs
    tl.store(out_ptr + query_q.to(tl.int64)[:, None] * n_docs + n0 + col[None, :], acc,
             mask=live_q[:, None] & (n0 + col < n_end)[None, :])


def launch_halves(Q, D, lengths, tiling):
    n_queries, q_tokens, dim = Q.shape
    n_docs, n_tokens, _ = D.shape
    block_q, block_d, warps, stages, max_registers = (*tiling, 0)[:5]
    rows = maxsim._Rows.of(block_q, n_queries, q_tokens)
    config = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, Q.dtype, *maxsim._device_limits(Q.device),
                                  tiling=maxsim.Tiling(*tiling[:4]))
    out = torch.empty(rows.n_splits, n_queries, n_docs, device=Q.device, dtype=torch.float32)
    grid = (triton.cdiv(n_docs, config.group) * rows.n_blocks,)

    def run():
        run.compiled = maxsim_halves_kernel[grid](Q, D, lengths, out, n_queries, n_docs, q_tokens, n_tokens,
                                                  rows.lq_tile, rows.qpb, rows.n_splits, config.group, DIM=dim,
                                                  BLOCK_Q=block_q, BLOCK_D=block_d, QPB_PAD=rows.qpb_pad,
                                                  GROUP=maxsim.SCORE_GROUP, num_warps=warps, num_stages=stages,
                                                  maxnreg=max_registers or None)
        return out[0] if rows.n_splits == 1 else out.sum(0)
    return run


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    tilings = [tuple(int(v) for v in a.split(",")) for a in sys.argv[2:]] or [(256, 64, 8, 3), (128, 64, 4, 3)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{rounds} rotated rounds, do_bench medians")
    for name, shape in SHAPES.items():
        _maxsim_inputs.cache_clear()
        Q, D, lengths = _maxsim_inputs(*shape)
        n_queries, q_tokens, n_docs, *_ = shape
        flops = 2 * n_queries * q_tokens * lengths.sum().item() * shape[-1]
        shipped = maxsim.pick_config(n_queries, q_tokens, n_docs, shape[-1], Q.dtype, Q.device)
        expected = maxsim.launch_maxsim(Q, D, None, lengths, "sum", shipped)
        contenders = {f"shipped {shipped.block_q}x{shipped.block_d} w{shipped.num_warps} s{shipped.num_stages}":
                      lambda: maxsim.launch_maxsim(Q, D, None, lengths, "sum", shipped)}
        for tiling in tilings:
            run = launch_halves(Q, D, lengths, tiling)
            got = run().clone()
            err = ((got - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
            label = f"halves {tiling[0]}x{tiling[1]} w{tiling[2]} s{tiling[3]}" + "".join(f" r{v}" for v in tiling[4:])
            print(f"{name} {label}: max relative difference from shipped {err:.1e}, registers {run.compiled.n_regs}, "
                  f"spills {run.compiled.n_spills}", flush=True)
            assert err < 1e-4, err
            contenders[label] = run
        times = rotated_rounds(contenders, rounds)
        for label, values in times.items():
            ms = sorted(values)[len(values) // 2]
            print(f"{name} {label:<28} median {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in values)})", flush=True)


if __name__ == "__main__":
    main()
