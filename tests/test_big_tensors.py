"""Tensors past 2^31 elements (GPU only): int64 addressing in MaxSim and the MoE dispatch.
The reference runs on the rows that sit beyond the 2^31-element mark."""
import pytest
import torch

import fused_ops
from fused_ops import reference

from conftest import ON_GPU, assert_close

pytestmark = pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30
                                if ON_GPU else True, reason="needs a GPU with >= 40 GiB")
BIG = 2**31 + 2**20


def test_maxsim_varlen_past_int32_offsets():
    d = 128
    tokens = BIG // d + 1000
    D = torch.empty(tokens, d, device="cuda", dtype=torch.bfloat16).normal_()
    lengths = torch.full((tokens // 200,), 200, device="cuda")
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = lengths.cumsum(0)
    Q = torch.randn(2, 16, d, device="cuda", dtype=torch.bfloat16)
    scores = fused_ops.maxsim_varlen(Q, D, offsets)
    tail = slice(lengths.numel() - 3, lengths.numel())         # documents that start past 2^31 elements
    assert int(offsets[tail.start]) * d > 2**31
    D_tail = D[int(offsets[tail.start]):int(offsets[tail.stop])].reshape(3, 200, d)
    assert_close(scores[:, tail], reference.maxsim(Q.double(), D_tail.double()), torch.bfloat16)
    del D


def test_moe_experts_past_int32_rows():
    K, H, N, E = 8320, 32, 16, 4
    M = BIG // K + 64
    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16).normal_()
    idx = torch.randint(0, E, (M, 1), device="cuda", dtype=torch.int32)
    w = torch.rand(M, 1, device="cuda")
    w1, w2 = torch.randn(E, H, K, device="cuda", dtype=torch.bfloat16) * 0.02, \
        torch.randn(E, N, H, device="cuda", dtype=torch.bfloat16)
    y = fused_ops.moe_experts(x, w, idx, w1, None, w2, None)
    tail = slice(M - 64, M)
    ref = reference.moe_experts(x[tail].double(), w[tail].double(), idx[tail], w1.double(), None, w2.double(), None)
    assert_close(y[tail], ref, torch.bfloat16)
