"""softmax_laplace: temperature softmax followed by Laplace (additive) smoothing, row-wise.

p = softmax(x / T); p = (p + alpha) / (1 + alpha * N), float32 out.
Rows up to SINGLE_PASS_MAX wide live in registers (one read, one write); wider rows take an
online max/sum pass and a write pass (two reads, one write).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference, tuning
from ._runtime import FP_FUSION, row_tiles, rows, skips_dispatcher, use_triton

LOG2E = 1.4426950408889634
SINGLE_PASS_MAX = 32768     # widest row kept whole in registers (32 warps x 32 lanes x 32 values)
ONLINE_BLOCK = 4096         # the fallback's chunk width on the two-pass path
ONLINE_WARPS = 8


@triton.jit
def _laplace(e, inv_sum, alpha_scaled, inv_norm):
    # (e / sum + alpha) / (1 + alpha * N) with the two divisions folded into multiplies
    return e * (inv_sum * inv_norm) + alpha_scaled


@triton.jit
def softmax_laplace_rows_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                                scale, alpha_scaled, inv_norm,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M whole rows per program; `scale` = log2(e) / temperature > 0.

    The rows stay in registers in their own dtype and the exponentials are recomputed for the
    store: half the registers of an fp32 copy, so 32K-wide rows fit without spilling.
    """
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    mask = (row[:, None] < n_rows) & (col[None, :] < n_cols)
    row64 = row.to(tl.int64)
    x = tl.load(x_ptr + row64[:, None] * stride_x + col[None, :], mask=mask, other=float("-inf"))
    m = tl.max(x, axis=1).to(tl.float32)[:, None] * scale       # max(x * scale) as scale > 0
    s = tl.sum(tl.exp2(x.to(tl.float32) * scale - m), axis=1)    # padding lanes: exp2(-inf) = 0
    p = _laplace(tl.exp2(x.to(tl.float32) * scale - m), 1.0 / s[:, None], alpha_scaled, inv_norm)
    tl.store(out_ptr + row64[:, None] * stride_out + col[None, :], p, mask=mask)


@triton.jit
def softmax_laplace_online_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out,
                                  scale, alpha_scaled, inv_norm, BLOCK_N: tl.constexpr):
    """One row per program: an online max/sum pass, then a write pass."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    col = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    has_nan = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, n_cols, BLOCK_N):
        c = start + col
        z = tl.load(x_row + c, mask=c < n_cols, other=float("-inf")).to(tl.float32) * scale
        has_nan |= (z != z).to(tl.int32)          # max() may drop NaN; the flag keeps it
        m_new = tl.maximum(m, z)
        # lanes that have seen only -inf keep (m, s) = (-inf, 0) instead of computing -inf - -inf
        seen = m_new != float("-inf")
        s = tl.where(seen, s * tl.exp2(m - m_new) + tl.exp2(z - m_new), s)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(tl.where(m != float("-inf"), s * tl.exp2(m - m_row), 0.0), axis=0)
    s_row = tl.where(tl.max(has_nan, axis=0) > 0, float("nan"), s_row)
    inv_sum = 1.0 / s_row
    for start in range(0, n_cols, BLOCK_N):
        c = start + col
        z = tl.load(x_row + c, mask=c < n_cols, other=float("-inf")).to(tl.float32) * scale
        p = _laplace(tl.exp2(z - m_row), inv_sum, alpha_scaled, inv_norm)
        tl.store(out_row + c, p, mask=c < n_cols)


# ---------------------------------------------------------------------------------------------
# configs: the shipped JSON for this device (tuning.py), else the whole-row heuristic
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoftmaxConfig:
    """One launch's blocks: the rows kernel takes BLOCK_M rows of BLOCK_N (the row width to a
    power of two) per program; the online kernel one row per program (block_m 1) in BLOCK_N chunks."""
    block_m: int
    block_n: int
    num_warps: int


def config_from_json(entry: dict) -> SoftmaxConfig:
    return SoftmaxConfig(**entry)


def softmax_bucket(n_rows: int, n_cols: int) -> str:
    """Rows and columns to powers of two: the key a launch's config is stored under."""
    return tuning.pow2_bucket(M=n_rows, N=n_cols)


def bucket_shape(bucket: str) -> tuple[int, int]:
    """'M64_N1024' -> (64, 1024)."""
    m, n = bucket.split("_")
    return int(m[1:]), int(n[1:])


def is_online(bucket: str) -> bool:
    """Whether the bucket's rows are too wide to keep whole (the two-pass kernel)."""
    return bucket_shape(bucket)[1] > SINGLE_PASS_MAX


def fallback_config(bucket: str, family: str) -> SoftmaxConfig:
    """The built-in config (the same on every family): about 2K values per program, 16 (at most
    32) a thread, on the rows kernel; 4096-wide chunks in 8 warps on the online kernel."""
    if is_online(bucket):
        return SoftmaxConfig(1, ONLINE_BLOCK, ONLINE_WARPS)
    return SoftmaxConfig(*row_tiles(*bucket_shape(bucket)))


def launch_softmax_laplace(logits: torch.Tensor, temperature: float, alpha: float,
                           config: Optional[SoftmaxConfig] = None) -> torch.Tensor:
    x = rows(logits)
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return out.reshape(logits.shape)
    if config is None:
        config = tuning.config_for("softmax_laplace", softmax_bucket(n_rows, n_cols), fallback_config,
                                   config_from_json)
    inv_norm = 1.0 / (1.0 + alpha * n_cols)
    args = (LOG2E / temperature, alpha * inv_norm, inv_norm)
    if n_cols <= SINGLE_PASS_MAX:
        if config.block_n < n_cols:
            raise ValueError(f"softmax_laplace: {config} is narrower than the {n_cols}-wide rows")
        grid = (triton.cdiv(n_rows, config.block_m),)
        softmax_laplace_rows_kernel[grid](x, out, n_rows, n_cols, x.stride(0), out.stride(0), *args,
                                          BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                                          enable_fp_fusion=FP_FUSION)
    else:
        softmax_laplace_online_kernel[(n_rows,)](x, out, n_cols, x.stride(0), out.stride(0), *args,
                                                 BLOCK_N=config.block_n, num_warps=config.num_warps,
                                                 enable_fp_fusion=FP_FUSION)
    return out.reshape(logits.shape)


def shipped_configs() -> dict:
    """Every config the launcher can choose -> (is it the online kernel's, compile targets): the
    fallback of each width at a few and at many rows, and every shipped JSON entry (its file's
    family only)."""
    every = tuple(tuning.FAMILY_CC.values())
    configs = {}
    for n_rows in (32, 1 << 20):
        for n_cols in (8, 64, 1024, 4096, SINGLE_PASS_MAX, 2 * SINGLE_PASS_MAX):
            bucket = softmax_bucket(n_rows, n_cols)
            configs[(is_online(bucket), fallback_config(bucket, "generic"))] = every
    for targets, _, bucket, entry in tuning.shipped_buckets("softmax_laplace"):
        key = (is_online(bucket), config_from_json(entry))
        configs[key] = tuple(sorted(set(configs.get(key, ())) | set(targets)))
    return configs


def offline_builds():
    from .offline import KernelBuild
    scalars = {"n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "stride_out": "i32",
               "scale": "fp32", "alpha_scaled": "fp32", "inv_norm": "fp32"}
    builds = []
    for dt in ("bf16", "fp32"):
        types = {"x_ptr": f"*{dt}", "out_ptr": "*fp32", **scalars}
        for (online, c), targets in shipped_configs().items():
            if online:
                builds.append(KernelBuild(f"softmax_online_{dt}_N{c.block_n}_w{c.num_warps}",
                                          softmax_laplace_online_kernel, types, {"BLOCK_N": c.block_n},
                                          num_warps=c.num_warps, targets=targets))
            else:
                builds.append(KernelBuild(f"softmax_rows_{dt}_M{c.block_m}_N{c.block_n}_w{c.num_warps}",
                                          softmax_laplace_rows_kernel, types,
                                          {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                                          num_warps=c.num_warps, targets=targets))
    return builds


def _softmax_laplace(logits: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    if use_triton(logits):
        return launch_softmax_laplace(logits, temperature, alpha)
    return reference._softmax_laplace(logits, temperature, alpha).to(torch.float32)


_softmax_laplace_op = torch.library.custom_op("fused_ops::softmax_laplace", mutates_args=())(_softmax_laplace)


@_softmax_laplace_op.register_fake
def _(logits, temperature, alpha):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def softmax_laplace(logits: torch.Tensor, *, temperature: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """Temperature softmax over the last dim, then Laplace smoothing; float32 probabilities."""
    reference.check_softmax_laplace(logits, temperature, alpha)
    op = _softmax_laplace if skips_dispatcher(logits) else _softmax_laplace_op
    return op(logits, float(temperature), float(alpha))
