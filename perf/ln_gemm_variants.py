"""The folded layernorm_linear gemm (16-bit, 8192 x 8320 x 4096) in variants, against cuBLAS
F.linear, in alternating rounds: the shipped one-tile-per-program kernel, and a persistent kernel
(one program per SM walking the tiles), with the tile loop flattened into the K loop (the next
tile's loads overlap this tile's epilogue) or not, storing y through pointers or a TMA
descriptor. The row-statistics pass is timed alone and each gemm without it, so the sum says what
the whole op would take. Each contender is checked against a float32 reference first.
Warp-specialised builds of the persistent kernel (tl.range(warp_specialize=True), num_warps=4: a
producer and two consumer warpgroups under triton 3.6 on sm_90) hung on the H200 at every tile
tried (ln_gemm_variants.txt) and are left out; so does a plain matmul built so (perf/matmul_ws_check.py).

    python -m perf.ln_gemm_variants [rounds] [name ...]    (CUDA machine; names pick contenders)
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

LN = importlib.import_module("fused_ops.layernorm_linear")

M, K, N = 8192, 8320, 4096


@triton.jit
def persistent_folded_gemm_kernel(x_desc, w_desc, y_desc, y_ptr, stats_ptr, sums_ptr, M, N, K, stride_y,
                                  PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
                                  TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    n_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), n_m * tl.cdiv(N, BLOCK_N), PROGRAMS, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        group_m = tl.minimum(n_m - first_m, GROUP_M)
        first_row = (first_m + (tile % in_group) % group_m) * BLOCK_M
        first_col = ((tile % in_group) // group_m) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ki in range(k_steps):
            a = x_desc.load([first_row, ki * BLOCK_K])
            b = w_desc.load([first_col, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        row = first_row + tl.arange(0, BLOCK_M)
        col = first_col + tl.arange(0, BLOCK_N)
        mean = tl.load(stats_ptr + row, mask=row < M, other=0.0)
        rstd = tl.load(stats_ptr + M + row, mask=row < M, other=0.0)
        c1 = tl.load(sums_ptr + col, mask=col < N, other=0.0)
        c2 = tl.load(sums_ptr + N + col, mask=col < N, other=0.0)
        tile_y = LN.ln_project(acc, mean, rstd, c1, c2)
        if TMA_STORE:
            y_desc.store([first_row, first_col], tile_y.to(y_desc.dtype))
        else:
            LN.store_tile(y_ptr, stride_y, row, col, M, N, tile_y)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    picked = sys.argv[2:]
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K) + 3.0, rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    sums, folded = LN.weight_sums(w, gamma, beta, bias)
    stats = torch.empty((2, M), dtype=torch.float32, device="cuda")
    y = torch.empty((M, N), dtype=x.dtype, device="cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    reference = F.linear(F.layer_norm(x.float(), (K,), gamma.float(), beta.float(), 1e-5), w.float(), bias.float())

    def stats_pass():
        LN.launch_row_stats(x, stats, 1e-5)

    def shipped(cfg):
        return lambda: LN.launch_folded_gemm(x, folded, stats, sums, y, cfg)

    def persistent(cfg, flatten, tma_store):
        x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(folded, [cfg.block_n, cfg.block_k])
        y_desc = TensorDescriptor.from_tensor(y, [cfg.block_m, cfg.block_n])
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        programs = min(n_sm, tiles)
        return lambda: persistent_folded_gemm_kernel[(programs,)](
            x_desc, w_desc, y_desc, y, stats, sums, M, N, K, y.stride(0), PROGRAMS=programs, FLATTEN=flatten,
            TMA_STORE=tma_store, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    G = LN.GemmConfig
    contenders = {
        "shipped 128x256 s4": shipped(G(128, 256, 64, 8, 8, 4)),
        "persist 128x256 s4 flat": persistent(G(128, 256, 64, 8, 8, 4), True, False),
        "persist 128x256 s3 flat tma-store": persistent(G(128, 256, 64, 8, 8, 3), True, True),
        "persist 128x256 s4": persistent(G(128, 256, 64, 8, 8, 4), False, False),
        "cublas F.linear": lambda: F.linear(x, w, bias),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"M K N = {M} {K} {N} bf16, {rounds} alternated rounds, do_bench medians (ms)")
    stats_pass()
    working = {}
    for name, fn in contenders.items():
        if picked and name not in picked and name != "cublas F.linear":
            continue
        print(f"{name:<36} checking", flush=True)
        try:
            y.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = ((y.float() - reference).abs().max() / reference.abs().max()).item()
            if name != "cublas F.linear" and not err < 2e-2:
                print(f"{name:<36} WRONG: max error {err:.3g} of the largest output")
                continue
            working[name] = fn
        except Exception as exc:                   # a variant that does not compile is reported, not fatal
            print(f"{name:<36} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
    times = {name: [] for name in ["stats pass", *working]}
    for _ in range(rounds):
        times["stats pass"].append(do_bench(stats_pass, rep=50))
        for name, fn in working.items():
            times[name].append(do_bench(fn, rep=100))
    median = {name: sorted(t)[rounds // 2] for name, t in times.items()}
    cublas = median["cublas F.linear"]
    for name, ts in times.items():
        whole = median[name] + (median["stats pass"] if name not in ("stats pass", "cublas F.linear") else 0.0)
        print(f"{name:<36} median {median[name]:.4f}  best {min(ts):.4f}  with stats {whole:.4f} "
              f"({whole / cublas:.3f}x cuBLAS)  rounds: {' '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
