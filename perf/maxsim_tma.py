"""MaxSim's chunks loaded through a TMA descriptor instead of per-thread pointers, on the two
compute-bound shapes (perf/maxsim_tiles.py's), against the shipped kernel in rotated rounds.

The shipped chunk loop copies each 64-token chunk to shared memory with cp.async (per-thread
addresses, a barrier a stage) and, past a document's end, repeats its last token. A TMA box cannot
repeat a row, so here a document's last chunk ends at its last token instead, re-reading tokens of
the chunk before it (the max is unchanged). That needs every document to hold at least BLOCK_D
tokens; both shapes do (lengths >= 100). Scoring path only: padded D, sum, 16-bit, d = 128.

    python -m perf.maxsim_tma [rounds] [block_q,block_d,warps,stages ...]      (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_ops.tunables import _maxsim_inputs
from perf.harness import rotated_rounds

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPES = {"nq16": (16, 32, 10000, 300, 100, 300, 128), "colpali": (1, 1024, 1000, 1030, 1030, 1030, 128)}


@triton.jit
def maxsim_tma_kernel(q_ptr, d_desc, len_ptr, out_ptr, n_queries, n_docs, q_tokens, n_tokens, lq_tile, qpb,
                      n_splits, group, DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                      QPB_PAD: tl.constexpr,
                      GROUP: tl.constexpr):
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
    n_chunks = tl.sum(tl.where(live_doc, tl.cdiv(len_all, BLOCK_D), 0), axis=0)

    n = n0
    pos = n * n_tokens                                          # row of the document's next chunk
    left = tl.load(len_ptr + n).to(tl.int32)                    # its tokens from there on
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    acc_rows = tl.zeros([BLOCK_Q, GROUP], tl.float32)
    for _step in range(0, n_chunks):
        # the last chunk ends at the document's end (re-reading tokens already scored)
        chunk = d_desc.load([pos + tl.minimum(left - BLOCK_D, 0), 0])
        sim = tl.dot(q, tl.trans(chunk))
        m = tl.maximum(m, tl.max(sim, axis=1))
        last = left <= BLOCK_D
        if last:
            acc_rows = tl.where(col[None, :] == n - n0, m[:, None], acc_rows)
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        n += last.to(tl.int32)
        next_left = tl.load(len_ptr + n, mask=n < n_end, other=0).to(tl.int32)
        pos = tl.where(last, n * n_tokens, pos + BLOCK_D)
        left = tl.where(last, next_left, left - BLOCK_D)

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


def launch_tma(Q, D, lengths, tiling):
    n_queries, q_tokens, dim = Q.shape
    n_docs, n_tokens, _ = D.shape
    block_q, block_d, warps, stages, max_registers = (*tiling, 0)[:5]
    rows = maxsim._Rows.of(block_q, n_queries, q_tokens)
    assert int(lengths.min()) >= block_d
    config = maxsim.choose_config(n_queries, q_tokens, n_docs, dim, Q.dtype, *maxsim._device_limits(Q.device),
                                  tiling=maxsim.Tiling(*tiling[:4]))
    desc = TensorDescriptor.from_tensor(D.view(n_docs * n_tokens, dim), [block_d, dim])
    out = torch.empty(rows.n_splits, n_queries, n_docs, device=Q.device, dtype=torch.float32)
    grid = (triton.cdiv(n_docs, config.group) * rows.n_blocks,)

    def run():
        run.compiled = maxsim_tma_kernel[grid](Q, desc, lengths, out, n_queries, n_docs, q_tokens, n_tokens,
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
            if tiling[1] > lengths.min():
                continue                                        # needs lengths >= block_d
            run = launch_tma(Q, D, lengths, tiling)
            got = run().clone()
            err = ((got - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
            label = f"tma {tiling[0]}x{tiling[1]} w{tiling[2]} s{tiling[3]}" + "".join(f" r{v}" for v in tiling[4:])
            print(f"{name} {label}: max relative difference from shipped {err:.1e}, registers {run.compiled.n_regs}, "
                  f"spills {run.compiled.n_spills}", flush=True)
            assert err < 1e-4, err
            contenders[label] = run
        times = rotated_rounds(contenders, rounds)
        for label, values in times.items():
            ms = sorted(values)[len(values) // 2]
            print(f"{name} {label:<24} median {ms:.4f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in values)})", flush=True)


if __name__ == "__main__":
    main()
