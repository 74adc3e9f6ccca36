"""layernorm_linear in float32 at wide N (x [M, 8320], N = 4096, tf32 not allowed): the op as shipped,
and its float32 gemm with the dot on the FMA units ("ieee", shipped before) and as three tf32 products on the
tensor cores ("tf32x3": a = a_hi + a_lo, a @ b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, each term's
operands rounded to tf32's 10-bit mantissa) at several tiles, with cuBLAS F.linear alone and torch
(F.layer_norm + F.linear, float32) beside them. Each path's max error against a float64 reference
(of the largest output), on N(0, 1) rows and on rows of mean 100 and std 0.01, where the LayerNorm's
cancellation magnifies any error in the dot. CUDA-graph microseconds per call.

    python -m perf.ln_fp32_tf32x3 [M ...]        (CUDA machine)
"""
import contextlib
import sys

import torch
import torch.nn.functional as F
import triton

import fused_ops
from perf.ln_few_rows import LN, error, timed

K, N = 8320, 4096
TILES = [LN.GemmConfig(64, 128, 32, 8, 4, 3), LN.GemmConfig(64, 128, 32, 8, 4, 4), LN.GemmConfig(64, 128, 16, 8, 4, 4),
         LN.GemmConfig(64, 128, 32, 8, 8, 3), LN.GemmConfig(128, 128, 32, 8, 8, 4)]



def fma_tile(M: int):
    """The float32 gemm's tile by M when its dot ran on the FMA units (shipped before the tf32x3 dot)."""
    return LN.GemmConfig(64, 128, 32, 8, 8, 3) if M <= 64 else LN.GemmConfig(128, 128, 32, 8, 8, 3)


@contextlib.contextmanager
def precision(name: str):
    """The float32 gemm's tl.dot input precision forced to `name`."""
    saved = LN.gemm_precision
    LN.gemm_precision = lambda dtype, device: name
    try:
        yield
    finally:
        LN.gemm_precision = saved


def main(rows) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; float32, "
          f"K {K}, N {N}; CUDA-graph us per call; errors: max |y - y64| / max |y64| on N(0,1) rows and on "
          "rows of mean 100, std 0.01", flush=True)
    g, b, bias = (torch.randn(n, device="cuda") for n in (K, K, N))
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    for M in rows:
        xs = [torch.randn(M, K, device="cuda"), 100 + 0.01 * torch.randn(M, K, device="cuda")]
        wants = [F.linear(F.layer_norm(x.double(), (K,), g.double(), b.double()), w.double(), bias.double())
                 for x in xs]
        y = torch.empty(M, N, device="cuda")

        def line(label, run):
            errs = []
            for x, want in zip(xs, wants):
                y.fill_(float("nan"))
                errs.append(error(run(x), want))
            t = timed(lambda: run(xs[0]))
            return f"{label:<34} {t:8.1f}   err {errs[0]:.1e} / {errs[1]:.1e}"

        def tile_run(cfg):
            def run(x):
                LN._launch_gemm(x, g, b, w, bias, y, 1e-5, cfg)
                return y
            return run

        out = [line("op as shipped", lambda x: fused_ops.layernorm_linear(x, g, b, w, bias))]
        for prec in ("ieee", "tf32x3"):
            with precision(prec):
                for cfg in [fma_tile(M)] * (prec == "ieee") + TILES * (prec == "tf32x3"):
                    slices = LN.gemm_split(M, N, K, cfg, xs[0].device)[0]
                    tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}s{cfg.num_stages}"
                    out.append(line(f"{prec} {tile} [{slices}]", tile_run(cfg)))
        out.append(f"{'cublas F.linear alone (no LN)':<34} {timed(lambda: F.linear(xs[0], w, bias)):8.1f}")
        out.append(line("torch", lambda x: F.linear(F.layer_norm(x, (K,), g, b), w, bias)))
        print(f"M {M}:\n  " + "\n  ".join(out), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [33, 64, 128, 256, 1024, 4096])
