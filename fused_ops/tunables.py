"""Config spaces per GPU family for every tunable kernel, registered with `tuning`.

The launchers' built-in fallback tables live beside their kernels; this file says what the tuner
may try instead, prunes it by each family's shared memory and register budget, and knows how to
run and check one candidate.
"""
from __future__ import annotations

import functools
import itertools

import torch

from . import moe, reference, tuning

REFERENCE_MOE = dict(K=8320, H=4096, N=1536, E=8, k=4)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


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


def moe_space(family: str, shape: dict) -> list:
    per = moe.pairs_bucket(shape["M"] * shape["k"], shape["E"])
    out = []
    for block_m, g1, g2 in itertools.product(_moe_block_ms(per), _MOE_GEMMS, _MOE_GEMM2):
        stages = 3 if family == "sm_120" else None                  # 99 KB: fewer stages
        g1c = moe.GemmConfig(*g1[:4], stages or g1[4])
        g2c = moe.GemmConfig(*g2[:4], stages or g2[4])
        out.append(moe.MoeConfig(block_m, g1c, g2c))
    return out


def moe_fits(config, family: str) -> bool:
    limit = tuning.SHARED_LIMIT[family]
    for g in (config.gemm1, config.gemm2):
        if tuning.smem_gemm(config.block_m, g.block_n, g.block_k, g.num_stages) > limit:
            return False
        if not tuning.registers_ok(g.num_warps, config.block_m * g.block_n):
            return False
    return True


@functools.lru_cache(maxsize=2)
def _moe_inputs(M, K, H, N, E, k, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
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
        rows = slice(0, min(x.shape[0], 256))           # the reference on a slice keeps checks fast
        ref = reference._moe_experts(x[rows].float(), w[rows], i[rows], w1.float(), b1.float(), w2.float(),
                                     b2.float(), "gelu_tanh")
        return _rel_err(run()[rows], ref)

    return run, check


tuning.register(tuning.Tunable(
    name="moe_experts", space=moe_space, fits=moe_fits,
    bucket=lambda s: f"pairs{moe.pairs_bucket(s['M'] * s['k'], s['E'])}",
    fallback=moe.fallback_config, make_run=moe_make_run, to_json=moe.config_to_json,
    parse=moe.config_from_json,
    shapes=[dict(M=M, **REFERENCE_MOE) for M in (1, 32, 256, 2048, 8192)]))
