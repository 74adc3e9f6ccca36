"""maxsim / maxsim_varlen / maxsim_topk against the float64 reference.

Layouts share one kernel, so each case runs the padded layout and the same documents packed.
Forced configs (small blocks and groups) reach the paths the default config picks only for big
shapes: query splits (Lq > BLOCK_Q), several query groups, several document groups, many chunks.
"""
import importlib

import pytest
import torch

import fused_ops
from fused_ops import reference

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, assert_topk_match, pick, rand

maxsim_module = importlib.import_module("fused_ops.maxsim")
MaxSimConfig = maxsim_module.MaxSimConfig

SMALL = MaxSimConfig(block_q=16, block_d=16, group=2, num_warps=4, num_stages=2)


def lengths(n, padded, *, ends=(0, 1)):
    """Random lengths in [0, padded] that include the given edge values."""
    out = torch.randint(0, padded + 1, (n,), device=DEVICE)
    for i, v in enumerate(ends[:n]):
        out[i] = min(v, padded)
    return out


def pack(D, d_lengths):
    """Padded [Nd, Ld, d] + lengths -> packed [T, d] + offsets [Nd + 1]."""
    offsets = torch.zeros(D.shape[0] + 1, dtype=torch.int64, device=D.device)
    offsets[1:] = d_lengths.cumsum(0)
    rows = [D[n, : int(d_lengths[n])] for n in range(D.shape[0])]
    return (torch.cat(rows) if rows else D.new_zeros(0, D.shape[2])), offsets


def oracle(Q, D, q_lengths=None, d_lengths=None, reduction="sum"):
    return reference.maxsim(Q.double(), D.double(), q_lengths=q_lengths, d_lengths=d_lengths, reduction=reduction)


def check_both_layouts(Q, D, q_lengths, d_lengths, reduction, dtype, config=None):
    ref = oracle(Q, D, q_lengths, d_lengths, reduction)
    if config is None:
        padded = fused_ops.maxsim(Q, D, q_lengths=q_lengths, d_lengths=d_lengths, reduction=reduction)
    else:
        padded = maxsim_module.launch_maxsim(Q, D, q_lengths, d_lengths, reduction, config)
    assert padded.dtype == torch.float32 and padded.shape == (Q.shape[0], D.shape[0])
    assert_close(padded, ref, dtype)
    lens = d_lengths if d_lengths is not None else torch.full((D.shape[0],), D.shape[1], device=DEVICE)
    D_packed, offsets = pack(D, lens)
    if config is None:
        packed = fused_ops.maxsim_varlen(Q, D_packed, offsets, q_lengths=q_lengths, reduction=reduction)
    else:
        packed = maxsim_module.launch_maxsim_varlen(Q, D_packed, offsets, q_lengths, reduction, config)
    assert_close(packed, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_q_lengths", [False, True])
def test_matches_reference(dtype, reduction, with_q_lengths):
    Nq, Lq, Nd, Ld, d = pick((3, 5, 9, 11, 7), (13, 37, 300, 130, 96))
    Q, D = rand(Nq, Lq, d, dtype=dtype), rand(Nd, Ld, d, dtype=dtype)
    q_lengths = lengths(Nq, Lq, ends=(1, Lq)).clamp_min(1) if with_q_lengths else None
    check_both_layouts(Q, D, q_lengths, lengths(Nd, Ld, ends=(0, 1, Ld)), reduction, dtype)


@pytest.mark.parametrize("d, dtype", [(1, torch.bfloat16), (7, torch.float16), (16, torch.float32),
                                      (96, torch.bfloat16), (128, torch.float16)]
                         + pick([], [(100, torch.bfloat16), (200, torch.bfloat16), (255, torch.float16),
                                     (256, torch.float16), (256, torch.float32)]))
def test_embedding_dims(d, dtype):
    Q, D = rand(2, 3, d, dtype=dtype), rand(5, pick(6, 70), d, dtype=dtype)
    check_both_layouts(Q, D, None, lengths(5, D.shape[1]), "sum", dtype)


@pytest.mark.parametrize("Nq, Lq", [(1, 1), (5, 1), (2, 3), (3, 16), (2, 17), (1, 40), (4, 33)])
def test_query_blocks_splits_and_groups(Nq, Lq):
    """BLOCK_Q = 16: Lq <= 16 packs several queries per block, Lq > 16 splits a query."""
    dtype = torch.float16
    Q, D = rand(Nq, Lq, 20, dtype=dtype), rand(7, 37, 20, dtype=dtype)
    q_lengths = lengths(Nq, Lq, ends=(Lq, 1)).clamp_min(1)
    check_both_layouts(Q, D, q_lengths, lengths(7, 37, ends=(0, 37, 1, 16, 17)), "mean", dtype, SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_never_wins_the_max(dtype):
    """Every real similarity is negative and the pads are zero vectors: a pad masked with 0
    (instead of -inf) would win every max."""
    Q = rand(3, 4, 8, dtype=dtype).abs() + 0.1
    D = -(rand(5, 9, 8, dtype=dtype).abs() + 0.1)
    d_lengths = torch.tensor([1, 3, 9, 5, 2], device=DEVICE)
    D[torch.arange(9, device=DEVICE)[None, :] >= d_lengths[:, None]] = 0
    for config in (None, SMALL):
        check_both_layouts(Q, D, None, d_lengths, "sum", dtype, config)
    assert (fused_ops.maxsim(Q, D, d_lengths=d_lengths) < 0).all()


def test_empty_documents_score_minus_inf():
    Q, D = rand(2, 3, 5), rand(4, 6, 5)
    d_lengths = torch.tensor([0, 6, 0, 2], device=DEVICE)
    for reduction in ("sum", "mean"):
        out = fused_ops.maxsim(Q, D, d_lengths=d_lengths, reduction=reduction)
        assert torch.isneginf(out[:, [0, 2]]).all() and torch.isfinite(out[:, [1, 3]]).all()
    D_packed, offsets = pack(D, torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert torch.isneginf(fused_ops.maxsim_varlen(Q, D_packed, offsets)).all()


def test_no_documents_and_no_queries():
    Q = rand(3, 4, 8)
    assert fused_ops.maxsim(Q, rand(0, 5, 8)).shape == (3, 0)
    assert fused_ops.maxsim_varlen(Q, rand(0, 8), torch.zeros(1, dtype=torch.int64, device=DEVICE)).shape == (3, 0)
    assert fused_ops.maxsim(rand(0, 4, 8), rand(2, 5, 8)).shape == (0, 2)
    assert torch.isneginf(fused_ops.maxsim(Q, rand(2, 0, 8))).all()


def test_noncontiguous_inputs_and_int32_lengths():
    Q = rand(6, 4, 16)[::2]                                  # batch stride doubled
    D = rand(5, 7, 32)[..., ::2]                             # last-dim stride 2: copied to unit stride
    assert not Q.is_contiguous() and not D.is_contiguous()
    d_lengths = torch.tensor([7, 0, 3, 1, 7], dtype=torch.int32, device=DEVICE)
    q_lengths = torch.tensor([4, 1, 2], dtype=torch.int32, device=DEVICE)
    out = fused_ops.maxsim(Q, D, q_lengths=q_lengths, d_lengths=d_lengths)
    assert_close(out, oracle(Q, D, q_lengths, d_lengths), torch.float32)
    D_packed = rand(20, 32)[:, ::2]
    offsets = torch.tensor([0, 4, 4, 19], dtype=torch.int32, device=DEVICE)
    padded, lens = reference.unpack_documents(D_packed, offsets)
    out = fused_ops.maxsim_varlen(Q, D_packed, offsets, q_lengths=q_lengths)
    assert_close(out, oracle(Q, padded, q_lengths, lens), torch.float32)


def test_rows_apart_from_d_are_copied():
    """The kernel addresses tokens as rows of d elements and batches as whole rows: a D whose
    tokens are further apart, or whose documents are not a whole number of rows apart, is copied."""
    Q = rand(2, 3, 16)
    wide_rows = rand(5, 7, 24)[..., :16]                                        # token stride 24
    odd_batches = rand(5 * 7 * 16 + 5).as_strided((5, 7, 16), (7 * 16 + 1, 16, 1))   # doc stride 113
    d_lengths = torch.tensor([7, 0, 3, 1, 6], device=DEVICE)
    for D in (wide_rows, odd_batches):
        out = fused_ops.maxsim(Q, D, d_lengths=d_lengths)
        assert_close(out, oracle(Q, D, None, d_lengths), torch.float32)
    packed = rand(20, 24)[:, :16]
    offsets = torch.tensor([0, 4, 4, 19], device=DEVICE)
    padded, lens = reference.unpack_documents(packed, offsets)
    assert_close(fused_ops.maxsim_varlen(Q, packed, offsets), oracle(Q, padded, None, lens), torch.float32)


def test_packed_offsets_need_not_start_at_zero():
    Q, D_packed = rand(2, 3, 8), rand(30, 8)
    offsets = torch.tensor([5, 9, 9, 21, 30], device=DEVICE)
    padded, lens = reference.unpack_documents(D_packed[5:], offsets - 5)
    assert_close(fused_ops.maxsim_varlen(Q, D_packed, offsets), oracle(Q, padded, None, lens), torch.float32)


def test_bad_lengths_are_clamped_by_the_kernel():
    """Value checks are skipped during graph capture; the launcher must still stay in bounds."""
    Q, D = rand(2, 3, 8), rand(4, 6, 8)
    q_too_long = torch.tensor([9, 3], device=DEVICE)
    d_bad = torch.tensor([-2, 100, 6, 3], device=DEVICE)
    out = maxsim_module.launch_maxsim(Q, D, q_too_long, d_bad)
    expected = oracle(Q, D, torch.tensor([3, 3], device=DEVICE), torch.tensor([0, 6, 6, 3], device=DEVICE))
    assert_close(out, expected, torch.float32)
    D_packed = rand(10, 8)
    offsets = torch.tensor([-5, 4, 2, 50], device=DEVICE)          # documents [0, 4), [4, 4), [2, 10)
    out = maxsim_module.launch_maxsim_varlen(Q, D_packed, offsets)
    padded = torch.zeros(3, 8, 8, device=DEVICE)
    padded[0, :4], padded[2] = D_packed[:4], D_packed[2:]
    assert_close(out, oracle(Q, padded, None, torch.tensor([4, 0, 8], device=DEVICE)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 8, "all"])
def test_topk_with_ties(dtype, k):
    Nq, Nd = pick((3, 40), (16, 3000))
    Q, D = rand(Nq, 4, 8, dtype=dtype), rand(Nd, 6, 8, dtype=dtype)
    d_lengths = lengths(Nd, 6, ends=(0, 1))
    best = int(fused_ops.maxsim(Q[:1], D, d_lengths=d_lengths)[0].argmax())
    for n in (5, 17, Nd - 1):                   # exact duplicates of query 0's best document
        D[n], d_lengths[n] = D[best], d_lengths[best]
    k = Nd if k == "all" else k
    values, indices = fused_ops.maxsim_topk(Q, D, k, d_lengths=d_lengths, reduction="mean")
    ref_values, ref_indices = reference.maxsim_topk(Q.double(), D.double(), k, d_lengths=d_lengths, reduction="mean")
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (Nq, k)
    assert_topk_match(indices, ref_values, ref_indices)
    assert_close(values, ref_values, dtype)
    dup = sorted({best, 5, 17, Nd - 1})                       # equal best scores of query 0, lowest index first
    m = min(k, len(dup))
    assert indices[0, :m].tolist() == dup[:m]


@pytest.mark.parametrize("group", [16, 32])
def test_topk_candidates_span_several_groups(group):
    """Per-group candidates (k < group / 2) merged across groups, with a short last group."""
    Q, D = rand(5, 3, 16, dtype=torch.bfloat16), rand(77, 5, 16, dtype=torch.bfloat16)
    config = MaxSimConfig(block_q=16, block_d=16, group=group, num_warps=4, num_stages=2)
    values, indices = maxsim_module.launch_maxsim_topk(Q, D, 4, config=config)
    ref_values, ref_indices = reference.maxsim_topk(Q.double(), D.double(), 4)
    assert_topk_match(indices, ref_values, ref_indices)
    assert_close(values, ref_values, torch.bfloat16)


@pytest.mark.parametrize("k", [4, 12])
def test_topk_ties_at_the_cut_inside_one_group(k):
    """Ten equal best scores in one group of 32, cut by k: the kernel's threshold takes the tied
    documents lowest index first."""
    Q, D = rand(2, 3, 16, dtype=torch.bfloat16), rand(40, 5, 16, dtype=torch.bfloat16)
    best = int(fused_ops.maxsim(Q[:1], D)[0].argmax())
    D[3:13] = D[best]
    config = MaxSimConfig(block_q=16, block_d=16, group=32, num_warps=4, num_stages=2)
    values, indices = maxsim_module.launch_maxsim_topk(Q, D, k, config=config)
    ref_values, ref_indices = reference.maxsim_topk(Q.double(), D.double(), k)
    assert_topk_match(indices, ref_values, ref_indices)
    assert_close(values, ref_values, torch.bfloat16)
    tied = sorted({best, *range(3, 13)})
    assert indices[0, :min(k, len(tied))].tolist() == tied[:k]


def test_topk_of_split_queries():
    """Queries longer than BLOCK_Q are scored in splits whose sums add up outside the kernel, so
    their top-k goes through the full scores."""
    Q, D = rand(3, 40, 16, dtype=torch.float16), rand(30, 9, 16, dtype=torch.float16)
    q_lengths = torch.tensor([40, 17, 1], device=DEVICE)
    d_lengths = lengths(30, 9)
    config = MaxSimConfig(block_q=16, block_d=16, group=4, num_warps=4, num_stages=2)
    values, indices = maxsim_module.launch_maxsim_topk(Q, D, 2, q_lengths, d_lengths, "mean", config)
    ref_values, ref_indices = reference.maxsim_topk(Q.double(), D.double(), 2, q_lengths=q_lengths,
                                                    d_lengths=d_lengths, reduction="mean")
    assert_topk_match(indices, ref_values, ref_indices)
    assert_close(values, ref_values, torch.float16)


@pytest.mark.parametrize("op", ["maxsim", "maxsim_varlen", "maxsim_topk"])
def test_opcheck(op):
    Q, D = rand(2, 3, 8), rand(4, 5, 8)
    q_lengths, d_lengths = torch.tensor([3, 1], device=DEVICE), torch.tensor([5, 0, 2, 4], device=DEVICE)
    if op == "maxsim":
        args = (Q, D, q_lengths, d_lengths, "mean")
    elif op == "maxsim_varlen":
        D_packed, offsets = pack(D, d_lengths)
        args = (Q, D_packed, offsets, q_lengths, "sum")
    else:
        args = (Q, D, 2, q_lengths, d_lengths, "sum")
    torch.library.opcheck(getattr(torch.ops.fused_ops, op).default, args)


def test_compiles_fullgraph():
    Q, D = rand(2, 3, 8), rand(4, 5, 8)
    d_lengths = torch.tensor([5, 0, 2, 4], device=DEVICE)

    def score(Q, D, d_lengths):
        return fused_ops.maxsim(Q, D, d_lengths=d_lengths), fused_ops.maxsim_topk(Q, D, 2, d_lengths=d_lengths)

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    (scores, (values, indices)), (ref_scores, (ref_values, ref_indices)) = compiled(Q, D, d_lengths), score(Q, D, d_lengths)
    assert torch.equal(scores, ref_scores) and torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@pytest.mark.parametrize("bad, match", [
    (dict(reduction="max"), "reduction"),
    (dict(d_lengths=torch.tensor([6, 1, 2])), "d_lengths"),
    (dict(q_lengths=torch.tensor([0, 1])), "q_lengths"),
])
def test_bad_arguments_raise(bad, match):
    Q, D = rand(2, 3, 4), rand(3, 5, 4)
    bad = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in bad.items()}
    with pytest.raises(ValueError, match=match):
        fused_ops.maxsim(Q, D, **bad)
    with pytest.raises(ValueError, match="offsets"):
        fused_ops.maxsim_varlen(Q, rand(6, 4), torch.tensor([0, 4, 2], device=DEVICE))
    with pytest.raises(ValueError, match="k"):
        fused_ops.maxsim_topk(Q, D, 4)


def test_offline_builds_hold_every_config_the_launcher_picks():
    """fused_ops.offline compiles maxsim's offline_builds() for sm_90/100/120/80: every block size,
    warp and stage count the launcher can pick for a family must be among them, on both paths."""
    from fused_ops.offline import SHARED_LIMIT
    built = {(b.types["q_ptr"], b.constexprs["TOPK"], b.constexprs["BLOCK_Q"], b.constexprs["BLOCK_D"],
              b.num_warps, b.num_stages, cc) for b in maxsim_module.offline_builds() for cc in b.targets}
    picked = set()
    for dtype, dtype_name in ((torch.bfloat16, "*bf16"), (torch.float16, "*bf16"), (torch.float32, "*fp32")):
        for dim in (1, 7, 8, 16, 64, 100, 128, 136, 200, 255, 256):
            for n_queries, q_tokens in ((1, 1), (1, 32), (3, 5), (16, 32), (64, 8), (2, 100), (1, 1024), (4, 2048)):
                for n_docs, k in ((1, None), (10_000, None), (1_000_000, None), (1_000, 8), (1_000_000, 100)):
                    for cc, smem in SHARED_LIMIT.items():
                        cfg = maxsim_module.choose_config(n_queries, q_tokens, n_docs, dim, dtype, 132, smem, k)
                        topk = k is not None and 2 * k <= cfg.group and q_tokens <= cfg.block_q
                        picked.add((dtype_name, topk, cfg.block_q, cfg.block_d, cfg.num_warps, cfg.num_stages, cc))
    assert picked <= built, sorted(picked - built)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: tensors past 2^31 elements")
def test_int64_addressing_past_2_31_elements():
    d = 128
    rows = (1 << 31) // d + 4096                                   # > 2^31 elements of D
    D_packed = torch.empty(rows, d, dtype=torch.bfloat16, device=DEVICE)
    D_packed[-3000:] = rand(3000, d, dtype=torch.bfloat16)
    offsets = torch.tensor([rows - 3000, rows - 2000, rows - 1000, rows - 1], device=DEVICE)
    Q = rand(4, 32, d, dtype=torch.bfloat16)
    padded, lens = reference.unpack_documents(D_packed[rows - 3000:], offsets - (rows - 3000))
    assert_close(fused_ops.maxsim_varlen(Q, D_packed, offsets), oracle(Q, padded, None, lens), torch.bfloat16)
    D = D_packed.view(-1, 1024, d)                                  # padded view: the last documents lie past 2^31
    d_lengths = torch.zeros(D.shape[0], dtype=torch.int64, device=DEVICE)
    d_lengths[-2:] = torch.tensor([1024, 7], device=DEVICE)
    out = fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    assert torch.isneginf(out[:, :-2]).all()
    assert_close(out[:, -2:], oracle(Q, D[-2:], None, d_lengths[-2:]), torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="GPU sizes")
@pytest.mark.parametrize("Nq, Lq, Nd, Ld", [(1, 32, 2000, 300), (16, 32, 500, 300), (1, 1024, 20, 1030),
                                            (2, 2048, 5, 4096), (3, 100, 300, 33)])
def test_gpu_shapes_bf16(Nq, Lq, Nd, Ld):
    Q, D = rand(Nq, Lq, 128, dtype=torch.bfloat16), rand(Nd, Ld, 128, dtype=torch.bfloat16)
    q_lengths = lengths(Nq, Lq, ends=(Lq,)).clamp_min(1)
    d_lengths = torch.randint(Ld // 3, Ld + 1, (Nd,), device=DEVICE)
    check_both_layouts(Q, D, q_lengths, d_lengths, "sum", torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_cuda_graph_capture():
    """No host sync on the CUDA path: every op captures, and a replay sees new inputs."""
    Q, D = rand(4, 32, 128, dtype=torch.bfloat16), rand(300, 64, 128, dtype=torch.bfloat16)
    d_lengths = torch.randint(0, 65, (300,), device=DEVICE)
    D_packed, offsets = pack(D, d_lengths)

    def run():
        return (fused_ops.maxsim(Q, D, d_lengths=d_lengths), fused_ops.maxsim_varlen(Q, D_packed, offsets),
                *fused_ops.maxsim_topk(Q, D, 5, d_lengths=d_lengths))

    run()                                                           # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    Q.copy_(rand(4, 32, 128, dtype=torch.bfloat16))
    graph.replay()
    for got, want in zip(captured, run()):
        assert torch.equal(got, want)


@pytest.mark.skipif(not ON_GPU, reason="tf32 is a GPU mode")
@pytest.mark.parametrize("Nq, Lq, d", [(1, 32, 128), (16, 32, 128), (1, 300, 96), (3, 20, 256)])
def test_float32_keeps_float32_accuracy(Nq, Lq, d):
    """Where float32 takes the tensor cores (maxsim.fp32_tensor_cores: on Hopper, d <= 128) its dot is
    three tf32 products: float32's tolerance holds, on every layout and on the top-k path; where
    torch allows tf32, one product (~1e-3)."""
    Q, D = rand(Nq, Lq, d, dtype=torch.float32), rand(400, 300, d, dtype=torch.float32)
    q_lengths = lengths(Nq, Lq, ends=(Lq,)).clamp_min(1)
    d_lengths = torch.randint(1, 301, (400,), device=DEVICE)
    tensor = maxsim_module.fp32_tensor_cores(torch.float32, d, maxsim_module.tuning.device_family(Q.device))
    assert maxsim_module.dot_precision_for(torch.float32, d, Q.device) == ("tf32x3" if tensor else "ieee")
    check_both_layouts(Q, D, q_lengths, d_lengths, "sum", torch.float32)
    values, indices = fused_ops.maxsim_topk(Q, D, 7, q_lengths=q_lengths, d_lengths=d_lengths)
    expected = oracle(Q, D, q_lengths, d_lengths)
    assert_topk_match(indices, *torch.topk(expected, 7))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert maxsim_module.dot_precision_for(torch.float32, d, Q.device) == "tf32"
        assert_close(fused_ops.maxsim(Q, D, q_lengths=q_lengths, d_lengths=d_lengths), expected, torch.float32,
                     table={torch.float32: 1e-3})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
