"""Whether warp-specialised matmul builds (tl.range(warp_specialize=True)) run on this GPU under this
Triton: a plain bf16 matmul (8192 x 8320 x 4096, TMA descriptor loads, no LayerNorm), persistent or
one tile a program, each contender in its own subprocess with a 45 s limit (a hang is reported, not
waited out), with the same kernels unspecialised and cuBLAS beside them. Under triton 3.6 on sm_90
the specialisation needs num_warps=4 (at 8 the build silently keeps one partition) and a pointer
store (a descriptor store fails the warp-specialisation pass); ln_gemm_variants.txt has the runs.

    python -m perf.matmul_ws_check        (CUDA machine)
"""
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

M, K, N = 8192, 8320, 4096


@triton.jit
def tile_start(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of output tile `tile` in grouped order."""
    n_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    return (first_m + (tile % in_group) % group_m) * BLOCK_M, ((tile % in_group) // group_m) * BLOCK_N


@triton.jit
def store(c_ptr, rm, rn, M, N, acc):
    """acc as bf16 into c [M, N] at (rm, rn), through pointers (a descriptor store fails the
    warp-specialisation pass)."""
    r = rm + tl.arange(0, acc.shape[0])
    c = rn + tl.arange(0, acc.shape[1])
    tl.store(c_ptr + r[:, None] * N + c[None, :], acc.to(tl.bfloat16), mask=(r < M)[:, None] & (c < N)[None, :])


@triton.jit
def persistent_kernel(a_desc, b_desc, c_ptr, M, N, K, PROGRAMS: tl.constexpr, WS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      STAGES: tl.constexpr):
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), PROGRAMS, flatten=False,
                         warp_specialize=WS):
        rm, rn = tile_start(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ki in tl.range(k_steps, num_stages=STAGES):
            a = a_desc.load([rm, ki * BLOCK_K])
            b = b_desc.load([rn, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        store(c_ptr, rm, rn, M, N, acc)


@triton.jit
def tile_kernel(a_desc, b_desc, c_ptr, M, N, K, WS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                STAGES: tl.constexpr):
    rm, rn = tile_start(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for ki in tl.range(tl.cdiv(K, BLOCK_K), num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([rm, ki * BLOCK_K])
        b = b_desc.load([rn, ki * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    store(c_ptr, rm, rn, M, N, acc)


# name: (persistent, ws, BM, BN, BK, GROUP_M, warps, stages)
CONTENDERS = {
    "pers ws 128x256 w4 s3": (True, True, 128, 256, 64, 8, 4, 3),
    "pers ws 128x256 w4 s4": (True, True, 128, 256, 64, 8, 4, 4),
    "pers ws 128x128 w4 s4": (True, True, 128, 128, 64, 8, 4, 4),
    "tile ws 128x256 w4 s3": (False, True, 128, 256, 64, 8, 4, 3),
    "tile ws 128x128 w4 s4": (False, True, 128, 128, 64, 8, 4, 4),
    "tile ws 128x256 w4 s4": (False, True, 128, 256, 64, 8, 4, 4),
    "tile    128x256 w8 s4": (False, False, 128, 256, 64, 8, 8, 4),
    "pers    128x256 w8 s4": (True, False, 128, 256, 64, 8, 8, 4),
}


def one(name):
    persistent, ws, bm, bn, bk, gm, warps, stages = CONTENDERS[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    ad, bd = TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    if persistent:
        fn = lambda: persistent_kernel[(min(n_sm, tiles),)](ad, bd, c, M, N, K, PROGRAMS=min(n_sm, tiles), WS=ws,
                                                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                                                             STAGES=stages, num_warps=warps)
    else:
        fn = lambda: tile_kernel[(tiles,)](ad, bd, c, M, N, K, WS=ws, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                           GROUP_M=gm, STAGES=stages, num_warps=warps)
    t0 = time.time()
    c.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    ref = F.linear(a, b)
    err = ((c.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    print(f"  first call {time.time() - t0:.1f}s, max rel err {err:.2e}", flush=True)
    cub, mine = [], []
    for _ in range(5):
        cub.append(do_bench(lambda: F.linear(a, b), rep=100))
        mine.append(do_bench(fn, rep=100))
    cm, mm = sorted(cub)[2], sorted(mine)[2]
    print(f"{name:<24} {mm:.4f} ms  cuBLAS {cm:.4f}  ratio {mm / cm:.3f}  rounds {' '.join(f'{t:.3f}' for t in mine)}",
          flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "one":
        one(sys.argv[2])
    else:
        print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
        for name in CONTENDERS:
            print(f"== {name}", flush=True)
            try:
                r = subprocess.run([sys.executable, "-m", "perf.matmul_ws_check", "one", name], timeout=45,
                                   capture_output=True, text=True)
                print(r.stdout.strip()[-1500:] or "", (r.stderr.strip()[-600:] if r.returncode else ""), flush=True)
            except subprocess.TimeoutExpired:
                print("  TIMEOUT (45 s)", flush=True)
