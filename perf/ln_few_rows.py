"""layernorm_linear at few rows and wide N (x [M, 8320], N = 4096), CUDA-graph microseconds per call,
each path's error against a float64 reference.

16-bit: the public op, and the gemm path at three tiles, each with K cut into SMs // tiles slices
(what the op does where its tiles leave half the SMs or more idle: gemm_split), SMs / tiles rounded
up, 2 * SMs / tiles rounded up, and K whole (the statistics pass + gemm it ran before the split);
cuBLAS F.linear alone and torch beside them. (float32: perf/ln_fp32_tiles.py.)
(perf/results/NVIDIA_H100_80GB_HBM3/ln_few_rows.txt, perf/results/NVIDIA_H200/ln_few_rows.txt)

    python -m perf.ln_few_rows        (CUDA machine)
"""
import contextlib
import importlib

import torch
import torch.nn.functional as F
import triton

import fused_ops

LN = importlib.import_module("fused_ops.layernorm_linear")
K, N = 8320, 4096
TILES = [LN.GemmConfig(64, 128, 64, 8, 4, 4), LN.GemmConfig(128, 128, 64, 8, 8, 4),
         LN.GemmConfig(64, 64, 128, 8, 4, 4)]
# slices from (tiles, SMs); None: the op's own rule
SPLITS = {"SMs // tiles": None, "SMs / tiles up": lambda t, n: -(-n // t),
          "2 SMs / tiles up": lambda t, n: -(-2 * n // t), "K whole": lambda t, n: 1}


@contextlib.contextmanager
def split_policy(slices):
    """The gemm's K cut into slices(tiles, SMs) slices (within whole BLOCK_K steps), or the op's rule."""
    saved = LN.gemm_split
    if slices is not None:
        def split(M, N, K, cfg, device):
            tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
            return LN._k_slices(slices(tiles, LN.sm_count(device)), K, cfg.block_k)
        LN.gemm_split = split
    try:
        yield
    finally:
        LN.gemm_split = saved


def timed(f) -> float:
    f()
    return 1e3 * triton.testing.do_bench_cudagraph(f, rep=100)


def error(y, want) -> float:
    return ((y.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "CUDA-graph us per call")
    for dt, rows in ((torch.bfloat16, (1, 8, 32, 64, 128, 256)),):
        g, b, bias = (torch.randn(n, device="cuda", dtype=dt) for n in (K, K, N))
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(dt)
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            y = torch.empty(M, N, device="cuda", dtype=dt)
            want = F.linear(F.layer_norm(x.double(), (K,), g.double(), b.double()), w.double(), bias.double())
            out = [f"public op {timed(lambda: fused_ops.layernorm_linear(x, g, b, w, bias)):.1f}"]
            picked = LN.pick_gemm_config(M, dt, x.device)
            for cfg in TILES:
                tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/{cfg.num_stages}"
                for name, slicing in SPLITS.items():
                    with split_policy(slicing):
                        slices = LN.gemm_split(M, N, K, cfg, x.device)[0]
                        t = timed(lambda: LN._launch_gemm(x, g, b, w, bias, y, 1e-5, cfg))
                    mark = "*" if cfg == picked and slicing is None else ""
                    out.append(f"{tile} {name}{mark} [{slices}] {t:.1f} (err {error(y, want):.1e})")
            out.append(f"cublas {timed(lambda: F.linear(x, w, bias)):.1f}")
            out.append(f"torch {timed(lambda: F.linear(F.layer_norm(x, (K,), g, b), w, bias)):.1f}")
            print(dt, "M", M, " | ".join(out), flush=True)
    print("* the op's own tile and split; [n] K slices")


if __name__ == "__main__":
    main()
