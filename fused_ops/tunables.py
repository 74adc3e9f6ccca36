"""Config spaces per GPU family for every tunable kernel, registered with `tuning`.

The launchers' built-in fallbacks live beside their kernels; this file says what the tuner may
try instead, prunes it by each family's shared memory and register budget, and knows how to run
and check one candidate (on CUDA; the reference on a slice of the output keeps checks fast).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools

import torch

from . import moe, reference, tuning
from ._runtime import pow2, sm_count

# the package exports functions under these modules' names
ln = importlib.import_module("fused_ops.layernorm_linear")
maxsim = importlib.import_module("fused_ops.maxsim")

REFERENCE_MOE = dict(K=8320, H=4096, N=1536, E=8, k=4)
REFERENCE_LN = dict(K=8320, N=4096)
# issue 5's MaxSim shapes (bf16, d = 128): rerank 1 query against 100k documents, 16 queries
# sharing 10k documents (real lengths uniform in [lo, hi]), ColPali (full-length pages)
MAXSIM_SHAPES = [dict(Nq=1, Lq=32, Nd=100_000, Ld=300, lo=100, hi=300, d=128),
                 dict(Nq=16, Lq=32, Nd=10_000, Ld=300, lo=100, hi=300, d=128),
                 dict(Nq=1, Lq=1024, Nd=1000, Ld=1030, lo=1030, hi=1030, d=128)]
# issue 5's top-k shape: 16 queries, the best 100 of 1M short documents
MAXSIM_TOPK_SHAPES = [dict(Nq=16, Lq=32, Nd=1_000_000, Ld=128, lo=100, hi=128, d=128, k=100)]
CHECK_ROWS = 256                 # output rows (documents for maxsim) the reference recomputes


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _generator() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


# ---------------------------------------------------------------------------------------------
# moe_experts: block_m (pairs per tile) x one GEMM config per GEMM
# ---------------------------------------------------------------------------------------------
_MOE_GEMMS = [
    # block_n, block_k, group_m, warps, stages: narrow column blocks stream weights over many SMs
    # (small batches); wide ones reuse each gathered x tile (large batches)
    (64, 128, 1, 4, 4), (64, 128, 1, 4, 5), (128, 64, 4, 4, 4), (128, 64, 8, 8, 4), (256, 64, 8, 8, 3),
    (256, 64, 8, 8, 4), (256, 64, 4, 8, 4),
]
_MOE_GEMM2 = [(64, 128, 1, 4, 4), (64, 64, 4, 4, 4), (128, 64, 8, 8, 4)]


def _moe_block_ms(pairs_per_expert: int) -> tuple:
    if pairs_per_expert <= 16:
        return (16, 32)
    if pairs_per_expert <= 256:
        return (32, 64, 128)
    return (64, 128)


def moe_bucket(shape: dict) -> str:
    return f"pairs{moe.pairs_bucket(shape['M'] * shape['k'], shape['E'])}"


def moe_space(family: str, shape: dict) -> list:
    per = moe.pairs_bucket(shape["M"] * shape["k"], shape["E"])
    out = []
    for block_m, g1, g2 in itertools.product(_moe_block_ms(per), _MOE_GEMMS, _MOE_GEMM2):
        stages = 3 if family == "sm_120" else None                  # 99 KB: fewer stages
        g1c = moe.GemmConfig(*g1[:4], stages or g1[4])
        g2c = moe.GemmConfig(*g2[:4], stages or g2[4])
        out.append(moe.MoeConfig(block_m, g1c, g2c))
    return out


def moe_fits(config, family: str, shape: dict) -> bool:
    limit = tuning.SHARED_LIMIT[family]
    for g in (config.gemm1, config.gemm2):
        if tuning.smem_gemm(config.block_m, g.block_n, g.block_k, g.num_stages) > limit:
            return False
        if not tuning.registers_ok(g.num_warps, config.block_m * g.block_n):
            return False
    return True


@functools.lru_cache(maxsize=2)
def _moe_inputs(M, K, H, N, E, k, dtype=torch.bfloat16):
    g = _generator()
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    w1 = torch.randn(E, H, K, device="cuda", dtype=dtype, generator=g) * K ** -0.5
    w2 = torch.randn(E, N, H, device="cuda", dtype=dtype, generator=g) * H ** -0.5
    b1 = torch.randn(E, H, device="cuda", dtype=dtype, generator=g) * 0.1
    b2 = torch.randn(E, N, device="cuda", dtype=dtype, generator=g) * 0.1
    logits = torch.randn(M, E, device="cuda", generator=g)
    top = logits.topk(k, dim=-1)
    return x, top.values.softmax(-1), top.indices.to(torch.int32), w1, b1, w2, b2


def moe_make_run(shape: dict, config):
    args = _moe_inputs(*(shape[n] for n in ("M", "K", "H", "N", "E", "k")))

    def run():
        return moe.launch_moe_experts(*args, "gelu_tanh", config=config)

    def check():
        x, w, i, w1, b1, w2, b2 = args
        rows = slice(0, min(x.shape[0], CHECK_ROWS))
        ref = reference._moe_experts(x[rows].float(), w[rows], i[rows], w1.float(), b1.float(), w2.float(),
                                     b2.float(), "gelu_tanh")
        return _rel_err(run()[rows], ref)

    return run, check


tuning.register(tuning.Tunable(
    name="moe_experts", space=moe_space, fits=moe_fits, bucket=moe_bucket,
    fallback=lambda shape, family: moe.fallback_config(moe_bucket(shape), family),
    make_run=moe_make_run, parse=moe.config_from_json,
    shapes=[dict(M=M, **REFERENCE_MOE) for M in (1, 32, 256, 2048, 8192)]))


# ---------------------------------------------------------------------------------------------
# layernorm_linear: the large-N gemm (16-bit, folded weight); float32 keeps its one tile
# ---------------------------------------------------------------------------------------------
_LN_GEMMS = [
    # block_m, block_n, block_k, group_m, warps, stages
    # 64-row tiles: at M = 256 and N = 4096, 128 programs (128-row tiles give 64 for 132+ SMs)
    (64, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 5), (64, 256, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4),
    # wgmma / tcgen05-sized tiles for many rows
    (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (128, 128, 64, 4, 8, 4), (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 4),
    # 99 KB (sm_120): 32-wide K steps keep 3 to 5 stages in flight beside the epilogue's headroom
    (64, 128, 32, 8, 4, 4), (64, 128, 32, 8, 4, 5), (128, 64, 32, 8, 4, 4), (128, 128, 32, 8, 8, 3),
    (128, 128, 32, 8, 8, 4), (64, 64, 64, 8, 4, 4),
]


def ln_bucket(shape: dict) -> str:
    return ln.gemm_bucket(shape["M"])


def ln_space(family: str, shape: dict) -> list:
    """The candidates whose row block is no taller than the bucket's rows."""
    return [ln.GemmConfig(*c) for c in _LN_GEMMS if c[0] <= pow2(shape["M"])]


def ln_fits(config, family: str, shape: dict) -> bool:
    return (ln.gemm_shared(config) <= tuning.SHARED_LIMIT[family]
            and tuning.registers_ok(config.num_warps, config.block_m * config.block_n))


@functools.lru_cache(maxsize=1)
def _ln_inputs(M, K, N, dtype=torch.bfloat16):
    g = _generator()
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    gamma = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dtype)
    beta = (0.1 * torch.randn(K, device="cuda", generator=g)).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(dtype)
    bias = (0.1 * torch.randn(N, device="cuda", generator=g)).to(dtype)
    return x, gamma, beta, w, bias


def ln_make_run(shape: dict, config):
    x, gamma, beta, w, bias = _ln_inputs(shape["M"], shape["K"], shape["N"])
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def run():
        ln._launch_gemm(x, gamma, beta, w, bias, y, 1e-5, config)
        return y

    def check():
        rows = slice(0, min(x.shape[0], CHECK_ROWS))
        ref = reference._layernorm_linear(x[rows].float(), gamma.float(), beta.float(), w.float(), bias.float(), 1e-5)
        return _rel_err(run()[rows], ref)

    return run, check


tuning.register(tuning.Tunable(
    name="layernorm_linear", space=ln_space, fits=ln_fits, bucket=ln_bucket,
    fallback=lambda shape, family: ln.gemm_fallback(ln_bucket(shape), family),
    make_run=ln_make_run, parse=ln.gemm_from_json,
    shapes=[dict(M=M, **REFERENCE_LN) for M in (256, 2048, 8192)]))


# ---------------------------------------------------------------------------------------------
# maxsim: the tile family's tiles x column blocks x warps x stages (documents per program follow
# the shape)
# ---------------------------------------------------------------------------------------------
MAXSIM_DTYPE = torch.bfloat16


def maxsim_bucket(shape: dict) -> str:
    return maxsim.tuning_bucket(shape["Nq"], shape["Lq"], shape["d"], MAXSIM_DTYPE)


def maxsim_space(family: str, shape: dict) -> list:
    """Each tile of the family no taller than the call's query rows, with half, all and twice its
    chunk, half, all and twice its warps (2 to 8: fewer warps per program can mean two programs
    per SM, one's dot beside the other's row maxima), and 2 to 4 stages."""
    rows = pow2(shape["Nq"] * shape["Lq"])
    out = []
    for tile in maxsim._family(MAXSIM_DTYPE, shape["d"])[1]:
        if tile.block_q > max(rows, 32):
            continue
        chunks = (tile.block_d // 2, tile.block_d, 2 * tile.block_d)
        warps = sorted({max(2, tile.num_warps // 2), tile.num_warps, min(8, 2 * tile.num_warps)})
        for block_d, num_warps, stages in itertools.product(chunks, warps, (2, 3, 4)):
            out.append(maxsim.Tiling(tile.block_q, block_d, num_warps, stages))
    return out


def maxsim_topk_space(family: str, shape: dict) -> list:
    """The scoring path's space, and its 8-warp tilings again with registers capped at 128 a
    thread: the top-k path's score tile takes an 8-warp program past the 128 at which two programs
    share an SM's register file (on the H200 the capped 256 x 64 tile went from 36.6 to 31.7 ms at
    Nd=1M, without spills: perf/results/NVIDIA_H200/maxsim_topk_ab.txt run 8)."""
    space = maxsim_space(family, shape)
    return space + [dataclasses.replace(t, max_registers=128) for t in space if t.num_warps == 8]


def maxsim_fits(tiling, family: str, shape: dict) -> bool:
    max_dim = maxsim._family(MAXSIM_DTYPE, shape["d"])[0]
    return (maxsim.tile_shared(tiling.tile, tiling.num_stages, max_dim, MAXSIM_DTYPE) <= tuning.SHARED_LIMIT[family]
            and tuning.registers_ok(tiling.num_warps, tiling.block_q * tiling.block_d))


@functools.lru_cache(maxsize=1)
def _maxsim_inputs(Nq, Lq, Nd, Ld, lo, hi, d):
    g = _generator()
    Q = torch.randn(Nq, Lq, d, device="cuda", dtype=MAXSIM_DTYPE, generator=g)
    D = torch.randn(Nd, Ld, d, device="cuda", dtype=MAXSIM_DTYPE, generator=g)
    lengths = torch.randint(lo, hi + 1, (Nd,), device="cuda", generator=g)
    return Q, D, lengths


def maxsim_make_run(shape: dict, tiling):
    Q, D, lengths = _maxsim_inputs(*(shape[n] for n in ("Nq", "Lq", "Nd", "Ld", "lo", "hi", "d")))
    config = maxsim.choose_config(shape["Nq"], shape["Lq"], shape["Nd"], shape["d"], MAXSIM_DTYPE,
                                  *maxsim._device_limits(Q.device), tiling=tiling)

    def run():
        return maxsim.launch_maxsim(Q, D, None, lengths, "sum", config)

    def check():
        docs = slice(0, min(D.shape[0], CHECK_ROWS))
        ref = reference._maxsim(Q.float(), D[docs].float(), None, lengths[docs], "sum")
        return _rel_err(run()[:, docs], ref)

    return run, check


def maxsim_fallback(shape: dict, family: str):
    return maxsim.heuristic_tiling(shape["Nq"], shape["Lq"], shape["d"], MAXSIM_DTYPE, tuning.SHARED_LIMIT[family])


tuning.register(tuning.Tunable(
    name="maxsim", space=maxsim_space, fits=maxsim_fits, bucket=maxsim_bucket, fallback=maxsim_fallback,
    make_run=maxsim_make_run, parse=maxsim.tiling_from_json, to_json=maxsim.tiling_to_json, shapes=MAXSIM_SHAPES))


def maxsim_topk_make_run(shape: dict, tiling):
    """check(): the returned scores against the reference's for the returned documents, and the
    share of the returned documents missing from the scoring path's top k (near-ties at the k-th
    place may swap; a wrong selection misses many)."""
    Q, D, lengths = _maxsim_inputs(*(shape[n] for n in ("Nq", "Lq", "Nd", "Ld", "lo", "hi", "d")))
    k = shape["k"]
    config = maxsim.choose_config(shape["Nq"], shape["Lq"], shape["Nd"], shape["d"], MAXSIM_DTYPE,
                                  *maxsim._device_limits(Q.device), k, tiling)

    def run():
        return maxsim.launch_maxsim_topk(Q, D, k, None, lengths, "sum", config)

    def check():
        values, idx = run()
        ref = torch.cat([reference._maxsim(Q[q:q + 1].float(), D[idx[q]].float(), None, lengths[idx[q]], "sum")
                         for q in range(Q.shape[0])])
        want = reference.ranked_topk(maxsim.launch_maxsim(Q, D, None, lengths, "sum"), k)[1]
        missing = 1 - sum(torch.isin(idx[q], want[q]).float().mean().item() for q in range(Q.shape[0])) / Q.shape[0]
        return max(_rel_err(values, ref), missing)

    return run, check


# the top-k path's groups of hundreds of documents (scores held in registers) change which tile
# is fastest; its entries are stored beside the scoring path's under the same buckets
tuning.register(tuning.Tunable(
    name="maxsim_topk", space=maxsim_topk_space, fits=maxsim_fits, bucket=maxsim_bucket, fallback=maxsim_fallback,
    make_run=maxsim_topk_make_run, parse=maxsim.tiling_from_json, to_json=maxsim.tiling_to_json,
    shapes=MAXSIM_TOPK_SHAPES))


# ---------------------------------------------------------------------------------------------
# fused_router: narrow 16-bit gates (FuseMoE's E=8); wider gates and float32 keep the table
# ---------------------------------------------------------------------------------------------
router = importlib.import_module("fused_ops.router")
REFERENCE_ROUTER = dict(K=8320, E=8, k=4)
FAMILY_SMS = {"sm_90": 132, "sm_100": 148, "sm_120": 170}   # H100/H200, B200, RTX 5090


def _family_sms(family: str) -> int:
    """The SM count the router's table sizes its grid by: the GPU at hand when it is of that
    family, else the family's flagship (a report for a named device)."""
    if torch.cuda.is_available() and tuning.current_device()[1] == family:
        return sm_count(torch.device("cuda", torch.cuda.current_device()))
    return FAMILY_SMS.get(family, 132)


def router_bucket(shape: dict) -> str:
    return router.router_bucket(shape["M"])


def router_space(family: str, shape: dict) -> list:
    """Raw-dot tiles (many rows) and broadcast tiles (few), each with K slices; grids of 16 to
    4096 programs only. Raw-dot tiles take 8 warps: a tuned entry serves both gatings, and at 4
    warps the distance gate's five row-sum tiles spill (offline compile, sm_90, 32 and 64 rows)."""
    M, K = shape["M"], shape["K"]
    raw = [router.RouterTiling(True, bm, 128, 8, st, sp)
           for bm, sp, st in itertools.product((32, 64), (1, 2, 4, 8, 16), (4, 6))]
    bcast = [router.RouterTiling(False, bm, bk, 4, 2, sp)
             for bm, sp, bk in itertools.product((1, 2), (1, 2, 4, 8, 16), (1024, 2048))]
    return [t for t in raw + bcast
            if 16 <= -(-M // t.block_m) * t.splits <= 4096 and t.splits <= max(1, K // 512)]


def router_fits(tiling, family: str, shape: dict) -> bool:
    if tiling.raw_dot:
        return ((tiling.num_stages - 1) * router.raw_dot_stage_bytes(shape["E"], tiling.block_m, tiling.block_k)
                <= tuning.SHARED_LIMIT[family] - router.SHARED_HEADROOM)
    # the broadcast product [BLOCK_M, E, BLOCK_K] in fp32 (32K values spill under triton 3.6)
    return tiling.block_m * pow2(shape["E"]) * tiling.block_k <= 16384


@functools.lru_cache(maxsize=1)
def _router_inputs(M, K, E, dtype=torch.bfloat16):
    g = _generator()
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)  # noqa: E731
    return rand(M, K), rand(K), rand(K), rand(E, K, scale=K ** -0.5), rand(E)


def router_make_run(shape: dict, tiling):
    x, g, b, w, wb = _router_inputs(shape["M"], shape["K"], shape["E"])
    config = router.make_config(shape["E"], shape["K"], tiling)
    call = (shape["k"], 1.0, 0.01, 1e-5, False, "softmax")

    def run():
        return router.launch_fused_router(x, g, b, w, wb, *call, config=config)

    def check():
        rows = slice(0, CHECK_ROWS)
        ref, _ = reference._fused_router(x[rows].double(), g.double(), b.double(), w.double(), wb.double(), *call)
        return _rel_err(run()[0][rows], ref)

    return run, check


tuning.register(tuning.Tunable(
    name="fused_router", space=router_space, fits=router_fits, bucket=router_bucket,
    fallback=lambda shape, family: router.fallback_tiling(shape["M"], shape["E"], shape["K"], _family_sms(family), 2,
                                                          True, family),
    make_run=router_make_run, parse=router.tiling_from_json,
    shapes=[dict(M=M, **REFERENCE_ROUTER) for M in (32, 256, 2048, 8192)]))


# ---------------------------------------------------------------------------------------------
# softmax_laplace and topk_gating: whole rows per program (the rows kernels), or one row in chunks
# (softmax's online kernel past SINGLE_PASS_MAX columns). Register-bound, no shared memory beyond
# the reductions' few bytes, so `fits` bounds the values a thread holds and is the same on every
# family. Default shapes: perf/bench_gating.py's.
# ---------------------------------------------------------------------------------------------
softmax = importlib.import_module("fused_ops.softmax")
topk = importlib.import_module("fused_ops.topk")
ROW_WARPS = (1, 2, 4, 8, 16, 32)
ROWS_MAX_VALUES = 32          # a thread's row values in the rows kernel (the 32K fallback's figure)
ONLINE_MAX_VALUES = 16        # per chunk in the online kernel, which keeps (max, sum, NaN) per lane too
TOPK_MAX_VALUES = 16          # the top-k tile packs each value into an int64 key


def _row_blocks(n_rows: int) -> list:
    """Rows per program: powers of two up to 64 and no more than the bucket's rows."""
    return [1 << i for i in range(7) if 1 << i <= pow2(n_rows)]


def _values_per_thread(values: int, num_warps: int) -> float:
    return values / (32 * num_warps)


def softmax_shape_bucket(shape: dict) -> str:
    return softmax.softmax_bucket(shape["M"], shape["N"])


def softmax_space(family: str, shape: dict) -> list:
    """The rows kernel: rows per program x warps at the row's width; the online kernel: chunk
    widths x warps."""
    bucket = softmax_shape_bucket(shape)
    if softmax.is_online(bucket):
        return [softmax.SoftmaxConfig(1, n, w) for n, w in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16))]
    width = softmax.bucket_shape(bucket)[1]
    return [softmax.SoftmaxConfig(m, width, w) for m, w in itertools.product(_row_blocks(shape["M"]), ROW_WARPS)]


def softmax_fits(config, family: str, shape: dict) -> bool:
    """At least one value a thread (no idle lanes), at most the kernel's budget."""
    online = softmax.is_online(softmax_shape_bucket(shape))
    values = _values_per_thread(config.block_m * config.block_n, config.num_warps)
    return (4 if online else 1) <= values <= (ONLINE_MAX_VALUES if online else ROWS_MAX_VALUES)


@functools.lru_cache(maxsize=1)
def _softmax_inputs(M, N, dtype=torch.bfloat16):
    return torch.randn(M, N, device="cuda", dtype=dtype, generator=_generator())


def softmax_make_run(shape: dict, config):
    x = _softmax_inputs(shape["M"], shape["N"])
    call = (0.7, 0.01)

    def run():
        return softmax.launch_softmax_laplace(x, *call, config=config)

    def check():
        rows = slice(0, CHECK_ROWS)
        return _rel_err(run()[rows], reference._softmax_laplace(x[rows].double(), *call))

    return run, check


tuning.register(tuning.Tunable(
    name="softmax_laplace", space=softmax_space, fits=softmax_fits, bucket=softmax_shape_bucket,
    fallback=lambda shape, family: softmax.fallback_config(softmax_shape_bucket(shape), family),
    make_run=softmax_make_run, parse=softmax.config_from_json,
    shapes=[dict(M=M, N=N) for M, N in ((32, 8), (32768, 8), (8192, 64), (4096, 4096), (8192, 32000),
                                        (1024, 65536))]))


def topk_shape_bucket(shape: dict) -> str:
    return topk.topk_bucket(shape["M"], shape["E"])


def topk_space(family: str, shape: dict) -> list:
    return [topk.TopkConfig(m, w) for m, w in itertools.product(_row_blocks(shape["M"]), ROW_WARPS)]


def topk_fits(config, family: str, shape: dict) -> bool:
    values = _values_per_thread(config.block_m * pow2(shape["E"]), config.num_warps)
    return 1 <= values <= TOPK_MAX_VALUES


@functools.lru_cache(maxsize=1)
def _topk_inputs(M, E):
    return torch.randn(M, E, device="cuda", generator=_generator()).softmax(-1)


def topk_make_run(shape: dict, config):
    p = _topk_inputs(shape["M"], shape["E"])

    def run():
        return topk.launch_topk_gating(p, shape["k"], False, config=config)

    def check():
        rows = slice(0, CHECK_ROWS)
        return _rel_err(run()[0][rows], reference._topk_gating(p[rows].double(), shape["k"], False)[0])

    return run, check


tuning.register(tuning.Tunable(
    name="topk_gating", space=topk_space, fits=topk_fits, bucket=topk_shape_bucket,
    fallback=lambda shape, family: topk.fallback_config(topk_shape_bucket(shape), family),
    make_run=topk_make_run, parse=topk.config_from_json,
    shapes=[dict(M=M, E=E, k=k) for M, E, k in ((32, 8, 4), (8192, 8, 4), (8192, 64, 8), (65536, 128, 8))]))
