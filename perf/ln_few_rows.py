"""layernorm_linear at few rows and wide N (x [M, 8320], N = 4096): the rows kernel against the gemm
path (statistics pass + folded gemm) and cuBLAS / torch, CUDA-graph microseconds per call, with each
path's error against a float64 reference. 16-bit rows take the gemm at every M since this probe
(rows kernel 58-362 us against the gemm's 48 on the H100); float32 keeps the rows kernel up to 16
rows, its gemm's FMA tiles being slower there.
(perf/results/NVIDIA_H100_80GB_HBM3/ln_few_rows.txt)

    python -m perf.ln_few_rows        (CUDA machine)
"""
import importlib

import torch
import torch.nn.functional as F
import triton

import fused_ops

LN = importlib.import_module("fused_ops.layernorm_linear")
K, N = 8320, 4096


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "CUDA-graph us per call")
    for dt in (torch.bfloat16, torch.float32):
        g, b, bias = (torch.randn(n, device="cuda", dtype=dt) for n in (K, K, N))
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(dt)
        for M in (1, 4, 8, 16, 32):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            y = torch.empty(M, N, device="cuda", dtype=dt)
            want = F.linear(F.layer_norm(x.double(), (K,), g.double(), b.double()), w.double(), bias.double())
            fns = {"public op": lambda: fused_ops.layernorm_linear(x, g, b, w, bias),
                   "rows path": lambda: LN._launch_rows(x, g, b, w, bias, y, 1e-5),
                   "gemm path": lambda: LN._launch_gemm(x, g, b, w, bias, y, 1e-5),
                   "cublas": lambda: F.linear(x, w, bias),
                   "torch": lambda: F.linear(F.layer_norm(x, (K,), g, b), w, bias)}
            out = []
            for name, f in fns.items():
                f()
                if name in ("rows path", "gemm path"):
                    err = ((y.double() - want).abs().max() / want.abs().max()).item()
                    name += f" (err {err:.1e})"
                out.append(f"{name} {1e3 * triton.testing.do_bench_cudagraph(f, rep=100):.1f}")
            print(dt, "M", M, " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
