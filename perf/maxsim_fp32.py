"""maxsim in float32 (tf32 not allowed): the op as shipped ("shipped": on sm_90, three tf32 products
on the tensor cores at maxsim.FP32_TENSOR_TILINGS), the dot on the FMA units ("ieee", shipped before)
at the float32 family's 32 x 32 tile, and tf32x3 at that tile and larger ones, against the einsum
path in float32. Shapes as the bf16 benchmark's, d=128: one query against 10k documents, 16 queries
sharing 10k, ColPali. (The FMA dot at the larger tiles spills: 25-470 ms, see the results file.)
Error: max |s - s64| / max |s64| over the first 500 documents (float64 reference); do_bench medians
of three rotated rounds.

    python -m perf.maxsim_fp32                    (CUDA machine)
"""
from __future__ import annotations

import importlib

import torch
import triton
from triton.testing import do_bench

import fused_ops
from fused_ops import reference
from perf.bench_maxsim import einsum_maxsim
from perf.variants import edited_module

maxsim = importlib.import_module("fused_ops.maxsim")
SHAPES = {"nq1": (1, 32, 10000, 300, 100, 300), "nq16": (16, 32, 10000, 300, 100, 300),
          "colpali": (1, 1024, 1000, 1030, 1030, 1030)}
TILINGS = [(32, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2)]
CHECK_DOCS = 500


def _inputs(n_queries, q_tokens, n_docs, d_tokens, lo, hi):
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = torch.nn.functional.normalize(torch.randn(n_queries, q_tokens, 128, device="cuda", generator=g), dim=-1)
    D = torch.nn.functional.normalize(torch.randn(n_docs, d_tokens, 128, device="cuda", generator=g), dim=-1)
    lengths = torch.randint(lo, hi + 1, (n_docs,), device="cuda", generator=g)
    return Q, D, lengths


def main() -> None:
    assert not torch.backends.cuda.matmul.allow_tf32
    shipped_precision = "PRECISION=dot_precision_for(Q.dtype, dim, Q.device)"
    fma = edited_module(maxsim, [(shipped_precision, "PRECISION=dot_precision(Q.dtype)")], "fma")
    three = edited_module(maxsim, [(shipped_precision, 'PRECISION="tf32x3"')], "tf32x3")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; float32, d 128")
    for name, shape in SHAPES.items():
        Q, D, lengths = _inputs(*shape)
        n_queries, q_tokens, n_docs = shape[:3]
        flops = 2 * n_queries * q_tokens * lengths.sum().item() * 128
        docs = slice(0, CHECK_DOCS)
        exact = reference._maxsim(Q.double(), D[docs].double(), None, lengths[docs], "sum")
        pad = torch.arange(D.shape[1], device="cuda")[None, :] >= lengths[:, None]
        runs = {"einsum": lambda: einsum_maxsim(Q, D, pad),
                "shipped": lambda: fused_ops.maxsim(Q, D, d_lengths=lengths)}
        for tiling in TILINGS:
            config = maxsim.choose_config(n_queries, q_tokens, n_docs, 128, torch.float32,
                                          *maxsim._device_limits(Q.device), tiling=maxsim.Tiling(*tiling))
            for kind, module in (("ieee", fma), ("tf32x3", three)):
                if kind == "tf32x3" or tiling == TILINGS[0]:
                    runs[f"{kind} {tiling}"] = (lambda m, c: lambda: m.launch_maxsim(Q, D, None, lengths, "sum", c))(
                        module, config)
        times, errors = {}, {}
        for _ in range(3):
            for label, run in runs.items():
                if times.get(label) == "failed":
                    continue
                try:
                    scores = run()
                    ms = do_bench(run, rep=100)
                except Exception as error:                          # a tile that does not build
                    print(f"  {name} {label}: failed ({type(error).__name__}: {str(error)[:120]})", flush=True)
                    times[label] = "failed"
                    continue
                errors[label] = ((scores[:, docs].double() - exact).abs().max() / exact.abs().max()).item()
                times.setdefault(label, []).append(ms)
        print(f"{name} (Nq {n_queries}, Lq {q_tokens}, Nd {n_docs}):", flush=True)
        for label, ms_list in times.items():
            if ms_list == "failed":
                continue
            ms = sorted(ms_list)[1]
            print(f"  {label}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  err {errors[label]:.1e}  "
                  f"(rounds: {' '.join(f'{t:.3f}' for t in ms_list)})", flush=True)


if __name__ == "__main__":
    main()
