"""MaxSim's launch plans (fused_ops/launch_plans.py): a repeated eager call launches the compiled
kernel its first call kept. Fresh values every call, other alignments, dtypes of the lengths, query
splits, empty documents, the packed and top-k paths and cleared tuning caches must all give the
reference's answer; bad lengths must still raise before a plan launches; a plan keeps no tensor of
the call that made it."""
import gc
import importlib
import weakref

import pytest
import torch

import fused_ops
from fused_ops import reference, tuning

from conftest import ON_GPU, assert_close, assert_topk_match, rand
from test_maxsim import oracle, pack

pytestmark = pytest.mark.skipif(not ON_GPU, reason="plans exist on CUDA only (not under the interpreter)")

maxsim_module = importlib.import_module("fused_ops.maxsim")
DTYPE = torch.bfloat16


def _plans() -> int:
    return len(maxsim_module._PLANS._plans)


def _inputs(Nq=4, Lq=40, Nd=50, Ld=33, d=64, lengths_dtype=torch.int64):
    Q, D = rand(Nq, Lq, d, dtype=DTYPE), rand(Nd, Ld, d, dtype=DTYPE)
    return Q, D, torch.randint(0, Ld + 1, (Nd,), device="cuda", dtype=lengths_dtype)


@pytest.mark.parametrize("Nq, Lq", [(4, 40), (1, 600)])          # 600 query tokens: split row blocks
def test_repeated_calls_on_fresh_values_take_one_plan(plan_launches, Nq, Lq):
    maxsim_module._PLANS.clear()
    for _ in range(3):
        Q, D, d_lengths = _inputs(Nq, Lq)
        assert_close(fused_ops.maxsim(Q, D, d_lengths=d_lengths), oracle(Q, D, None, d_lengths), DTYPE)
    assert _plans() == 1 and len(plan_launches) == 2


def test_documents_without_tokens_keep_their_count():
    Q = rand(3, 4, 8, dtype=DTYPE)
    for n_docs in (2, 5, 2):
        scores = fused_ops.maxsim(Q, rand(n_docs, 0, 8, dtype=DTYPE))
        assert scores.shape == (3, n_docs) and bool((scores == float("-inf")).all())


def test_a_plan_keeps_no_tensor_of_its_call():
    maxsim_module._PLANS.clear()
    Q, D, d_lengths = _inputs()
    scores = fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    alive = [weakref.ref(t) for t in (Q, D, d_lengths, scores)]
    del Q, D, d_lengths, scores
    gc.collect()
    assert _plans() == 1 and all(ref() is None for ref in alive)


def test_another_alignment_lengths_dtype_or_tuning_state_gets_its_own_plan():
    maxsim_module._PLANS.clear()
    Q, D, d_lengths = _inputs()
    fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    flat = rand(D.numel() + 1, dtype=DTYPE)
    shifted = flat[1:].view(D.shape)                                # 2 bytes off 16
    assert_close(fused_ops.maxsim(Q, shifted, d_lengths=d_lengths), oracle(Q, shifted, None, d_lengths), DTYPE)
    as_int32 = d_lengths.int()
    assert_close(fused_ops.maxsim(Q, D, d_lengths=as_int32), oracle(Q, D, None, d_lengths), DTYPE)
    tuning.clear_caches()
    assert_close(fused_ops.maxsim(Q, D, d_lengths=d_lengths), oracle(Q, D, None, d_lengths), DTYPE)
    assert _plans() == 4


def test_packed_and_topk_calls_through_plans():
    maxsim_module._PLANS.clear()
    d_lengths = _inputs(Nd=300)[2]                  # kept, so the packed tensor keeps its shape
    for _ in range(2):
        Q, D, _ = _inputs(Nd=300)
        D_packed, offsets = pack(D, d_lengths)
        want = oracle(Q, D, None, d_lengths)
        assert_close(fused_ops.maxsim_varlen(Q, D_packed, offsets), want, DTYPE)
        values, indices = fused_ops.maxsim_topk(Q, D, 7, d_lengths=d_lengths)
        ref_values, ref_indices = reference.ranked_topk(want, 7)
        assert_close(values, ref_values, DTYPE)
        assert_topk_match(indices, ref_values, ref_indices)
    assert _plans() == 2


def test_bad_lengths_raise_before_a_plan_launches(plan_launches):
    Q, D, d_lengths = _inputs()
    fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    assert len(plan_launches) == 1
    d_lengths[3] = D.shape[1] + 1
    with pytest.raises(ValueError, match="d_lengths"):
        fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    assert len(plan_launches) == 1


def test_inference_mode_calls_take_plans():
    with torch.inference_mode():
        maxsim_module._PLANS.clear()
        for _ in range(2):
            Q, D, d_lengths = _inputs()
            assert_close(fused_ops.maxsim(Q, D, d_lengths=d_lengths), oracle(Q, D, None, d_lengths), DTYPE)
    assert _plans() == 1
