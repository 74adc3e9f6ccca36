"""layernorm_linear in float32 at wide N (x [M, 8320], N = 4096): the float32 gemm at several tiles,
each with K whole, cut into SMs // tiles slices where the tiles leave half the SMs or more idle (the
op's rule, gemm_split), or into 2 SMs / tiles rounded up; the op (the few-rows kernel up to 16 rows,
perf/ln_fp32_few.py), cuBLAS F.linear alone and torch beside them. CUDA-graph microseconds per call,
each path's error against a float64 reference. With "op" first, the op, cuBLAS and torch only.

    python -m perf.ln_fp32_tiles [op] [M ...]        (CUDA machine)
"""
import sys

import torch
import torch.nn.functional as F
import triton

import fused_ops
from perf.ln_few_rows import LN, error, split_policy, timed

K, N = 8320, 4096
FEW = [LN.GemmConfig(16, 64, 32, 8, 4, 3), LN.GemmConfig(16, 128, 32, 8, 4, 3), LN.GemmConfig(16, 128, 16, 8, 4, 3),
       LN.GemmConfig(16, 256, 32, 8, 8, 3), LN.GemmConfig(16, 128, 64, 8, 8, 3), LN.GemmConfig(32, 128, 32, 8, 8, 3)]
MANY = [LN.GemmConfig(64, 64, 32, 8, 4, 3), LN.GemmConfig(64, 128, 32, 8, 8, 3), LN.GemmConfig(128, 128, 32, 8, 8, 3),
        LN.GemmConfig(128, 128, 16, 8, 8, 3), LN.GemmConfig(128, 128, 32, 8, 4, 3),
        LN.GemmConfig(128, 256, 16, 8, 8, 3), LN.GemmConfig(256, 128, 16, 8, 8, 3)]
SPLITS = {"rule": None, "2 SMs/tiles": lambda t, n: -(-2 * n // t), "K whole": lambda t, n: 1}


def main(rows, op_only: bool) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"float32, K {K}, N {N}; CUDA-graph us per call; [n] K slices", flush=True)
    g, b, bias = (torch.randn(n, device="cuda") for n in (K, K, N))
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    for M in rows:
        x = torch.randn(M, K, device="cuda")
        y = torch.empty(M, N, device="cuda")
        want = F.linear(F.layer_norm(x.double(), (K,), g.double(), b.double()), w.double(), bias.double())
        out = [f"public op {timed(lambda: fused_ops.layernorm_linear(x, g, b, w, bias)):.1f}"]
        out[0] += f" (err {error(fused_ops.layernorm_linear(x, g, b, w, bias), want):.1e})"
        for cfg in [] if op_only else (FEW if M <= 64 else []) + (MANY if M >= 32 else []):
            tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}s{cfg.num_stages}"
            seen = set()
            for name, slicing in SPLITS.items():
                with split_policy(slicing):
                    slices = LN.gemm_split(M, N, K, cfg, x.device)[0]
                    if slices in seen:                 # the same launch as an option before
                        continue
                    seen.add(slices)
                    y.fill_(float("nan"))
                    t = timed(lambda: LN._launch_gemm(x, g, b, w, bias, y, 1e-5, cfg))
                out.append(f"{tile} {name} [{slices}] {t:.1f} (err {error(y, want):.1e})")
        out.append(f"cublas {timed(lambda: F.linear(x, w, bias)):.1f}")
        out.append(f"torch {timed(lambda: F.linear(F.layer_norm(x, (K,), g, b), w, bias)):.1f}")
        print(f"M {M}:\n  " + "\n  ".join(out), flush=True)


if __name__ == "__main__":
    op_only = sys.argv[1:2] == ["op"]
    main([int(a) for a in sys.argv[1 + op_only:]] or [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024], op_only)
