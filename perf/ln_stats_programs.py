"""layernorm_linear's row statistics from a few programs of the folded gemm's own launch, against
the shipped statistics pass + gemm and cuBLAS, 8192 x 8320 x 4096 bf16, in alternated rounds
(perf/results/NVIDIA_H200/ln_stats_programs.txt: slower in every variant; not adopted).

The gemm's 1024 tiles of 128 x 256 fill 7.76 waves of the H200's 132 SMs: the last wave leaves 32
SMs idle for a whole tile-time. Here the first STATS_PROGRAMS tickets of the launch become statistics
programs: each streams whole row blocks of x through TMA (one SM each), stores their mean and rstd
and raises the row block's flag; every gemm tile waits for its row block's flag before its epilogue
only. 1024 tiles on 132 - 4 SMs are 8 whole waves, so four statistics programs should cost the gemm
no wave, as long as they stay ahead of the epilogues (a row-block group of 17 MB each ~0.1 ms).
Tickets come from an atomic counter, so every statistics role is held by a running program before
any tile can wait on it: no deadlock whatever order the hardware starts programs in.

    python -m perf.ln_stats_programs [rounds]      (CUDA machine)
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_ops.layernorm_linear import ln_project, ln_stats, store_tile, tile_pivot
from perf.harness import print_rounds, rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")
M, K, N = 8192, 8320, 4096


@triton.jit
def stats_programs_gemm_kernel(x_desc, s_desc, w_desc, stats_ptr, ready_ptr, sums_ptr, y_ptr, M, N, K, stride_y,
                               eps, STATS_PROGRAMS: tl.constexpr, STATS_ROWS: tl.constexpr, STATS_K: tl.constexpr,
                               STATS_STAGES: tl.constexpr, REDUCE: tl.constexpr, STAGES: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    ticket = tl.atomic_add(ready_ptr, 1)
    n_m = tl.cdiv(M, BLOCK_M)
    if ticket < STATS_PROGRAMS:
        lane = tl.arange(0, STATS_K)
        for pid_m in range(ticket, n_m, STATS_PROGRAMS):
            for sub in range(0, BLOCK_M, STATS_ROWS):
                first = pid_m * BLOCK_M + sub
                x0 = s_desc.load([first, 0]).to(tl.float32)
                pivot = tile_pivot(x0, K, STATS_K)
                s1 = tl.where((lane < K)[None, :], x0 - pivot[:, None], 0.0)
                s2 = s1 * s1
                if REDUCE:                   # sums per row each step: fewer registers, more shuffles
                    r1 = tl.sum(s1, axis=1)
                    r2 = tl.sum(s2, axis=1)
                    for k0 in tl.range(STATS_K, K, STATS_K, num_stages=STATS_STAGES):
                        xs = tl.where((k0 + lane < K)[None, :],
                                      s_desc.load([first, k0]).to(tl.float32) - pivot[:, None], 0.0)
                        r1 += tl.sum(xs, axis=1)
                        r2 += tl.sum(xs * xs, axis=1)
                else:
                    for k0 in tl.range(STATS_K, K, STATS_K, num_stages=STATS_STAGES):
                        xs = tl.where((k0 + lane < K)[None, :],
                                      s_desc.load([first, k0]).to(tl.float32) - pivot[:, None], 0.0)
                        s1 += xs
                        s2 += xs * xs
                    r1 = tl.sum(s1, axis=1)
                    r2 = tl.sum(s2, axis=1)
                t2 = r2
                d, rstd = ln_stats(r1, t2, K, eps)
                row = first + tl.arange(0, STATS_ROWS)
                tl.store(stats_ptr + row, pivot + d, mask=row < M)
                tl.store(stats_ptr + M + row, tl.where(t2 == 0.0, 0.0, rstd), mask=row < M)
            tl.debug_barrier()
            tl.atomic_xchg(ready_ptr + 1 + pid_m, 1, sem="release", scope="gpu")
    else:
        tile = ticket - STATS_PROGRAMS
        in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (tile // in_group) * GROUP_M
        group_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_m
        first_row, first_col = pid_m * BLOCK_M, ((tile % in_group) // group_m) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(x_desc.load([first_row, k0]), tl.trans(w_desc.load([first_col, k0])), acc)
        ready = tl.atomic_add(ready_ptr + 1 + pid_m, 0, sem="acquire", scope="gpu")
        while ready == 0:
            ready = tl.atomic_add(ready_ptr + 1 + pid_m, 0, sem="acquire", scope="gpu")
        row = first_row + tl.arange(0, BLOCK_M)
        col = first_col + tl.arange(0, BLOCK_N)
        mean = tl.load(stats_ptr + row, mask=row < M, other=0.0, cache_modifier=".cg")
        rstd = tl.load(stats_ptr + M + row, mask=row < M, other=0.0, cache_modifier=".cg")
        c1 = tl.load(sums_ptr + col, mask=col < N, other=0.0)
        c2 = tl.load(sums_ptr + N + col, mask=col < N, other=0.0)
        store_tile(y_ptr, stride_y, row, col, M, N, ln_project(acc, mean, rstd, c1, c2))


def launch(x, folded, sums, y, cfg, programs, rows, stats_k, stages=4, reduce=False, stats=None, gemm=True, eps=1e-5):
    n_m, n_n = triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n)
    ready = torch.zeros(1 + n_m, dtype=torch.int32, device=x.device)
    stats = torch.empty((2, M), dtype=torch.float32, device=x.device) if stats is None else stats
    x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
    s_desc = TensorDescriptor.from_tensor(x, [rows, stats_k])
    w_desc = TensorDescriptor.from_tensor(folded, [cfg.block_n, cfg.block_k])
    stats_programs_gemm_kernel[(programs + (n_m * n_n if gemm else 0),)](
        x_desc, s_desc, w_desc, stats, ready, sums, y, M, N, K, y.stride(0), eps, STATS_PROGRAMS=programs,
        STATS_ROWS=rows, STATS_K=stats_k, STATS_STAGES=stages, REDUCE=reduce, STAGES=cfg.num_stages, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps)
    return stats


VARIANTS = {f"S{s} {r}x{k} st{st}{' reduce' if red else ''}": (s, r, k, st, red) for s, r, k, st, red in
            ((4, 128, 64, 4, False), (4, 128, 128, 4, False), (4, 128, 128, 4, True), (4, 128, 256, 3, True),
             (4, 64, 256, 4, True), (6, 128, 128, 4, False), (8, 128, 128, 4, False))}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K), rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    cfg = LN.pick_gemm_config(M, x.dtype, x.device)
    sums, folded = LN.weight_sums(w, gamma, beta, bias)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {cfg}; "
          f"x ~ N(0, 1)", flush=True)
    want = F.linear(F.layer_norm(x.float(), (K,), gamma.float(), beta.float(), 1e-5), w.float(), bias.float())
    scale = want.abs().max().item()
    shipped = torch.empty((M, N), dtype=x.dtype, device="cuda")
    LN._launch_gemm(x, gamma, beta, w, bias, shipped, 1e-5, cfg, beside=False)
    print(f"shipped: max |y - fp32 reference| / max |y| {(shipped.float() - want).abs().max().item() / scale:.2e}")
    ref_stats = torch.empty((2, M), dtype=torch.float32, device="cuda")
    LN.launch_row_stats(x, ref_stats, 1e-5)

    # how fast a few programs alone read x (no gemm tiles): the rate the statistics must keep ahead of
    for name, v in VARIANTS.items():
        s = v[0]
        got = launch(x, folded, sums, shipped, cfg, *v, gemm=False)
        ms = triton.testing.do_bench(lambda: launch(x, folded, sums, shipped, cfg, *v, gemm=False), rep=100)
        rel = ((got - ref_stats).abs() / (ref_stats[1:].abs() + ref_stats.abs())).max().item()
        print(f"stats only {name:<22} {ms:.3f} ms  {x.numel() * 2 / ms / 1e6 / s:6.1f} GB/s per program  "
              f"max difference from row_stats_kernel / (|stat| + rstd) {rel:.1e}", flush=True)

    contenders = {"shipped stats pass + gemm":
                  lambda: LN._launch_gemm(x, gamma, beta, w, bias, shipped, 1e-5, cfg, beside=False)}
    outs = {}
    for name, v in VARIANTS.items():
        out = outs[name] = torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda")
        contenders[name] = lambda out=out, v=v: launch(x, folded, sums, out, cfg, *v)
    contenders["cublas F.linear"] = lambda: F.linear(x, w, bias)
    for name, out in outs.items():
        runs = []
        for _ in range(3):
            out.fill_(float("nan"))
            contenders[name]()
            runs.append(out.clone())
        same = all(torch.equal(r, runs[0]) for r in runs)
        err = (out.float() - want).abs().max().item() / scale
        vs = (out.float() - shipped.float()).abs().max().item() / scale
        print(f"{name}: max err / max |y| {err:.2e}, against shipped {vs:.2e}, same bits {same}", flush=True)
    print_rounds(rotated_rounds(contenders, rounds), "cublas F.linear", "cuBLAS")


if __name__ == "__main__":
    main()
