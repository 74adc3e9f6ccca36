"""layernorm_linear at 8192 x 8320 x 4096 (bf16) with the gemm's part-filled last wave spread over
every SM ("stream-K"), against the shipped op (statistics pass + one tile a program) and cuBLAS
F.linear, in rotated rounds.

The shipped gemm's 1024 tiles fill 7.76 waves of 132 SMs, and the last wave costs about a whole one
(ln_waves.txt). Here the statistics pass runs as shipped, the shipped gemm takes the whole waves
(924 tiles), and one program an SM shares the last 100 tiles' K steps evenly (99 each, of a tile's
130). A program's range spans at most two tiles: it first takes the head of the later one (from its
first K step) and writes that partial product to its own fp32 slot, then the tail of the earlier
one; the program that takes a tile's last K step adds the other programs' partials in a fixed order
(lowest program first) and applies the LayerNorm epilogue. Every partial a program waits for is
written by a lower program before that program waits for anything, so the waits cannot deadlock
(and the CPU interpreter, which runs programs in order, never waits).

    python -m perf.ln_stream_k [rounds]      (CUDA machine)
"""
from __future__ import annotations

import importlib
import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_ops._runtime import dot_upcast
from perf.harness import print_rounds, rotated_rounds

LN = importlib.import_module("fused_ops.layernorm_linear")
M, K, N = 8192, 8320, 4096


@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of tile `tile` in the shipped gemm's grouped order."""
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return (first_m + (tile % in_group) % group_m) * BLOCK_M, ((tile % in_group) // group_m) * BLOCK_N


@triton.jit
def _products(x_desc, w_desc, first_row, first_col, step_lo, step_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in tl.range(step_lo, step_hi, num_stages=STAGES):
        acc = tl.dot(x_desc.load([first_row, step * BLOCK_K]), tl.trans(w_desc.load([first_col, step * BLOCK_K])), acc)
    return acc


@triton.jit
def _settle(acc, tile, step_hi, steps, per, first_row, first_col, part_ptr, flag_ptr, epoch, stats_ptr, sums_ptr,
            y_ptr, M, N, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's last K steps: add the lower programs' partials and write y; else publish the partial."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    slot = r[:, None] * BLOCK_N + c[None, :]
    if step_hi == steps:
        for q in range((tile * steps) // per, tl.program_id(0)):
            while tl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="gpu") != epoch:
                pass
            acc += tl.load(part_ptr + q * BLOCK_M * BLOCK_N + slot)
        row = first_row + r
        col = first_col + c
        mean = tl.load(stats_ptr + row, mask=row < M, other=0.0)
        rstd = tl.load(stats_ptr + M + row, mask=row < M, other=0.0)
        c1 = tl.load(sums_ptr + col, mask=col < N, other=0.0)
        c2 = tl.load(sums_ptr + N + col, mask=col < N, other=0.0)
        LN.store_tile(y_ptr, stride_y, row, col, M, N, LN.ln_project(acc, mean, rstd, c1, c2))
    else:
        tl.store(part_ptr + tl.program_id(0).to(tl.int64) * BLOCK_M * BLOCK_N + slot, acc)
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + tl.program_id(0), epoch, sem="release", scope="gpu")


@triton.jit(do_not_specialize=["epoch"])
def stream_k_kernel(x_desc, w_desc, stats_ptr, sums_ptr, y_ptr, part_ptr, flag_ptr, epoch, M, N, K, stride_y,
                    first_tile, total, per, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    """K steps [p * per, (p + 1) * per) of the tiles from first_tile on, numbered one after another."""
    steps = tl.cdiv(K, BLOCK_K)
    lo = tl.program_id(0) * per
    hi = tl.minimum(lo + per, total)
    tile_lo = lo // steps
    tile_hi = (hi - 1) // steps
    end_lo = hi
    if tile_hi != tile_lo:                                      # the later tile's head first
        first_row, first_col = _tile_origin(first_tile + tile_hi, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _products(x_desc, w_desc, first_row, first_col, 0, hi - tile_hi * steps, BLOCK_M, BLOCK_N, BLOCK_K,
                        STAGES)
        _settle(acc, tile_hi, hi - tile_hi * steps, steps, per, first_row, first_col, part_ptr, flag_ptr, epoch,
                stats_ptr, sums_ptr, y_ptr, M, N, stride_y, BLOCK_M, BLOCK_N)
        end_lo = tile_hi * steps
    first_row, first_col = _tile_origin(first_tile + tile_lo, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _products(x_desc, w_desc, first_row, first_col, lo - tile_lo * steps, end_lo - tile_lo * steps, BLOCK_M,
                    BLOCK_N, BLOCK_K, STAGES)
    _settle(acc, tile_lo, end_lo - tile_lo * steps, steps, per, first_row, first_col, part_ptr, flag_ptr, epoch,
            stats_ptr, sums_ptr, y_ptr, M, N, stride_y, BLOCK_M, BLOCK_N)


class StreamK:
    """The op with the last wave shared: statistics pass, whole waves (the shipped kernel), stream-K."""

    def __init__(self, x, gamma, beta, w, bias, y, eps, cfg, sms):
        self.x, self.y, self.eps, self.cfg = x, y, eps, cfg
        (m, k), n = x.shape, w.shape[0]
        self.sums, self.folded = LN.weight_sums(w, gamma, beta, bias)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        self.tiles, self.whole = tiles, tiles // sms * sms
        self.total = (tiles - self.whole) * triton.cdiv(k, cfg.block_k)
        self.per = triton.cdiv(self.total, sms)
        self.programs = triton.cdiv(self.total, self.per) if self.total else 0
        self.stats = torch.empty((2, m), dtype=torch.float32, device=x.device)
        self.part = torch.empty((max(self.programs, 1), cfg.block_m, cfg.block_n), dtype=torch.float32, device=x.device)
        self.flags = torch.zeros(max(self.programs, 1), dtype=torch.int32, device=x.device)
        self.epochs = itertools.count(1)
        x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(self.folded, [cfg.block_n, cfg.block_k])
        # the shipped gemm's launch (launch_folded_gemm's arguments), on the whole waves' tiles only
        self.gemm_args = (x, self.folded, x_desc, w_desc, self.stats, self.sums, y, self.sums, m, n, k, k, x.stride(0),
                          self.folded.stride(0), y.stride(0))
        self.gemm_kwargs = dict(TMA=True, EVEN_K=k % cfg.block_k == 0, DOT_UPCAST=dot_upcast(x), SPLIT=False,
                                **LN.gemm_constexprs(cfg), num_warps=cfg.num_warps)
        self.stream_args = (x_desc, w_desc, self.stats, self.sums, y, self.part, self.flags)
        self.shape_args = (m, n, k, y.stride(0), self.whole, self.total, self.per)

    def __call__(self):
        LN.launch_row_stats(self.x, self.stats, self.eps)
        self.whole_waves()
        self.stream_k()
        return self.y

    def whole_waves(self):
        if self.whole:
            LN.layernorm_linear_folded_gemm_kernel[(self.whole, 1)](*self.gemm_args, **self.gemm_kwargs)

    def stream_k(self):
        cfg = self.cfg
        if self.total:
            return stream_k_kernel[(self.programs,)](
                *self.stream_args, next(self.epochs), *self.shape_args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, STAGES=cfg.num_stages, num_warps=cfg.num_warps)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, gamma, beta, w, bias = rand(M, K), rand(K), rand(K), rand(N, K, scale=K ** -0.5), rand(N)
    cfg = LN.pick_gemm_config(M, x.dtype, x.device)
    shipped_y, y = torch.empty((M, N), dtype=x.dtype, device="cuda"), torch.full((M, N), float("nan"), dtype=x.dtype,
                                                                                    device="cuda")
    stream_k = StreamK(x, gamma, beta, w, bias, y, 1e-5, cfg, torch.cuda.get_device_properties(0).multi_processor_count)
    LN._launch_gemm(x, gamma, beta, w, bias, shipped_y, 1e-5, cfg)
    stream_k()
    ref = F.linear(F.layer_norm(x.float(), (K,), gamma.float(), beta.float(), 1e-5), w.float(), bias.float())
    scale = ref.abs().max().item()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {cfg}; whole waves "
          f"{stream_k.whole} tiles, stream-K {stream_k.programs} programs x {stream_k.per} K steps")
    print(f"max |y - fp32 reference| / max |y|: shipped {(shipped_y.float() - ref).abs().max().item() / scale:.2e}, "
          f"stream-K {(y.float() - ref).abs().max().item() / scale:.2e}; NaN left {y.isnan().sum().item()}")
    compiled = stream_k.stream_k()
    print(f"stream-K kernel: {compiled.n_regs} registers, {compiled.n_spills} spills")
    contenders = {"shipped op": lambda: LN._launch_gemm(x, gamma, beta, w, bias, shipped_y, 1e-5, cfg),
                  "stream-K op": stream_k, "cublas F.linear": lambda: F.linear(x, w, bias),
                  "part: statistics pass": lambda: LN.launch_row_stats(x, stream_k.stats, 1e-5),
                  "part: shipped gemm": lambda: LN.layernorm_linear_folded_gemm_kernel[(stream_k.tiles, 1)](
                      *stream_k.gemm_args, **stream_k.gemm_kwargs),
                  "part: whole waves": stream_k.whole_waves, "part: stream-K": stream_k.stream_k}
    print_rounds(rotated_rounds(contenders, rounds), "cublas F.linear", "cuBLAS")


if __name__ == "__main__":
    main()
