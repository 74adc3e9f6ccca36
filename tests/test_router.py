"""fused_router against the float64 reference: LN -> gate (inner product or FuseMoE's distance) ->
temperature softmax -> Laplace smoothing -> top-k, in one launch for E <= 512.

Tolerances: the weights' relative error may be the dtype's (conftest TOLERANCE) plus the fp32
rounding of the largest logit divided by the temperature (distance logits are O(sqrt(K)), so
fp32 itself is that far from float64). Indices must equal the reference's wherever the
reference's weights are not tied within that same tolerance (the top k and the next one).
"""
import importlib

import pytest
import torch
import triton

import fused_ops
from fused_ops import reference

from conftest import DEVICE, DTYPES, ON_GPU, TOLERANCE, assert_topk_match, pick, rand, rel_err

GATINGS = ["softmax", "laplace"]

# (x shape, E, k); on CPU (4 SMs) 32+ rows take the tl.dot tiles (130 for E > 8), fewer the broadcast tiles
CASES = [
    ((3, 7), 8, 2),
    ((1, 1), 1, 1),
    ((32, 1023), 8, 4),
    ((5, 100), 60, 60),
    ((4, 64), 64, 1),
    ((2, 200), 128, 2),
    ((3, 50), 512, 512),
    ((130, 40), 64, 2),
    ((0, 16), 8, 2),
    ((2, 3, 20), 2, 2),
] + pick([], [
    ((8193, 8320), 8, 4),                       # 16-row tl.dot tiles, as at M = 8192
    ((32, 8320), 8, 4),
    ((4097, 1023), 512, 2),
    ((4097, 1023), 60, 60),
    ((1, 8320), 512, 512),
])


def _inputs(shape, E, dtype, scale=1.0, mean=0.0, std=1.0, affine=True, bias=True):
    """x and router parameters; `scale` multiplies LN's affine and the gate (logits scale with it)."""
    K = shape[-1]
    x = (mean + std * torch.randn(*shape, device=DEVICE)).to(dtype)
    g = rand(K, dtype=dtype, scale=scale) if affine else None
    b = rand(K, dtype=dtype, scale=scale) if affine else None
    w = rand(E, K, dtype=dtype, scale=scale * K ** -0.5)
    wb = rand(E, dtype=dtype, scale=scale) if bias else None
    return x, g, b, w, wb


def _check(x, g, b, w, wb, dtype, config=None, **kw):
    """fused_router's (weights, indices) against the reference; `config`: launch at that config."""
    up = lambda t: None if t is None else t.double()       # noqa: E731
    if config is None:
        weights, indices = fused_ops.fused_router(x, g, b, w, wb, **kw)
    else:
        router = importlib.import_module("fused_ops.router")
        weights, indices = router.launch_fused_router(
            x, g, b, w, wb, kw["k"], kw.get("temperature", 1.0), kw.get("alpha", 0.0), 1e-5,
            kw.get("renormalize", False), kw.get("gating", "softmax"), config=config)
    rw, ri = reference.fused_router(x.double(), up(g), up(b), w.double(), up(wb), **kw)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int32
    assert weights.shape == rw.shape and indices.shape == ri.shape
    logits = reference.router_logits(x.double(), up(g), up(b), w.double(), up(wb), 1e-5, kw.get("gating", "softmax"))
    finite = logits[torch.isfinite(logits)]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    tol = TOLERANCE[dtype] + 2.0 ** -22 * largest / kw.get("temperature", 1.0)
    assert rel_err(weights, rw) < tol
    # ties are judged on the reference's whole ranking, so a pick that swaps the k-th expert with the
    # (k+1)-th (not in the top k) is recognised as one; our indices are padded with its (k+1)-th
    E = w.shape[0]
    ranked_w, ranked_i = reference.fused_router(x.double(), up(g), up(b), w.double(), up(wb),
                                                **{**kw, "k": E, "renormalize": False})
    k, k1 = kw["k"], min(kw["k"] + 1, E)
    padded = torch.cat([indices.long().cpu(), ranked_i[..., k:k1].long().cpu()], dim=-1)
    assert_topk_match(padded, ranked_w[..., :k1], ranked_i[..., :k1], rtol=tol)
    return weights, indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(dtype, gating, case):
    shape, E, k = CASES[case]
    affine, bias, renormalize = case % 3 != 1, case % 2 == 0, case % 4 >= 2
    x, g, b, w, wb = _inputs(shape, E, dtype, affine=affine, bias=bias)
    _check(x, g, b, w, wb, dtype, k=k, temperature=0.7, alpha=0.01, renormalize=renormalize, gating=gating)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
@pytest.mark.parametrize("alpha", [0.0, 10.0])
def test_temperature_and_smoothing(dtype, gating, temperature, alpha):
    # at T = 1e-3 the parameters shrink with T, so logits / T stay O(1..sqrt(K)): a real test of the
    # scaling, not of the float64 oracle's conditioning
    x, g, b, w, wb = _inputs((pick(17, 8193), 100), 8, dtype, scale=min(1.0, temperature))
    weights, _ = _check(x, g, b, w, wb, dtype, k=3, temperature=temperature, alpha=alpha, gating=gating)
    assert (weights >= alpha / (1 + 8 * alpha) * (1 - 1e-6)).all()    # smoothing lifts every weight


@pytest.mark.parametrize("gating", GATINGS)
def test_tied_experts_go_to_the_lower_index(gating):
    x, g, b, w, wb = _inputs((pick(130, 8193), 64), 8, torch.float32, bias=False)
    w[5] = w[2]
    w[7] = w[2]
    w[4] = w[1]
    weights, indices = fused_ops.fused_router(x, g, b, w, None, k=8, gating=gating)
    ri = reference.fused_router(x.double(), g.double(), b.double(), w.double(), None, k=8, gating=gating)[1]
    assert torch.equal(indices.cpu(), ri.cpu())
    same = torch.ones_like(w)
    _, indices = fused_ops.fused_router(x, g, b, same, None, k=3, gating=gating)
    assert (indices.cpu() == torch.tensor([0, 1, 2], dtype=torch.int32)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gating", GATINGS)
def test_nan_row_gives_nan_weights_in_that_row_only(dtype, gating):
    x, g, b, w, wb = _inputs((pick(6, 300), 40), 8, dtype)
    x[2, 11] = float("nan")
    weights, indices = _check(x, g, b, w, wb, dtype, k=3, renormalize=True, gating=gating)
    assert torch.isnan(weights[2]).all() and not torch.isnan(weights[3:]).any()
    assert indices[2].tolist() == [0, 1, 2]                 # the reference's order for an all-NaN row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("rows", [5, 130])
def test_large_mean_tiny_spread(dtype, gating, rows):
    std = 0.01 if dtype == torch.float32 else 1.0
    x, g, b, w, wb = _inputs((rows, 300), 16, dtype, mean=1000.0, std=std)
    _check(x, g, b, w, wb, dtype, k=4, gating=gating)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("shape, E", [((7, 3000), 8), ((130, 600), 40), ((3, 1), 5)] + pick([], [((4097, 8320), 8)]))
def test_logits_match_reference(dtype, gating, shape, E):
    """The gate logits themselves (softmax and top-k are nearly blind to an error shared by a row's
    distances, e.g. in ||LN(x)||^2): every term of the distance algebra shows here. The first
    quarter of each row is shifted, so the pivot (the mean of the first K step) is far from the
    row mean and the terms in d = mean - pivot weigh in."""
    x, g, b, w, wb = _inputs(shape, E, dtype)
    x[..., : shape[-1] // 4] += 3.0
    logits = importlib.import_module("fused_ops.router").launch_router_logits(x, g, b, w, wb, 1e-5, gating)
    ref = reference.router_logits(x.double(), g.double(), b.double(), w.double(), wb.double(), 1e-5, gating)
    assert logits.dtype == torch.float32 and rel_err(logits, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E", [8, 16])
def test_dot_tiles_keep_the_logits_at_fp32_accuracy(dtype, E):
    """16-bit operands with fp32-accurate products: E=8 takes the raw dot (raw x against W * gamma
    as two 16-bit halves), E=16 the pivot path's tiles (the normalised row as two 16-bit halves).
    One 16-bit operand rounded once would put ~2^-9 (bf16) or ~2^-12 (fp16) of each product into
    the logits, a relative error of ~1e-3 or ~1e-4 that reorders experts closer than that (seen at
    M = 8193); the halves keep the logits near fp32's ~1e-6. Under the interpreter the halves are
    exact in its fp32 dot, so this checks the splits themselves."""
    x, g, b, w, wb = _inputs((pick(130, 8193), 1023), E, dtype)
    logits = importlib.import_module("fused_ops.router").launch_router_logits(x, g, b, w, wb, 1e-5, "softmax")
    ref = reference.router_logits(x.double(), g.double(), b.double(), w.double(), wb.double(), 1e-5, "softmax")
    assert rel_err(logits, ref) < 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("M, K", [(1, 2000), (2, 1500)] + pick([], [(32, 8320), (16, 4097), (256, 8320)]))
def test_few_rows_split_k_and_the_last_slice_finishes(dtype, gating, M, K):
    """Few rows split K over programs (broadcast tiles; 256 rows on a GPU: the raw dot's shipped
    slices); the last slice of each row block to arrive adds the parts up. The counters it uses
    must be back at zero afterwards, and a repeat gives the same bits."""
    router = importlib.import_module("fused_ops.router")
    x, g, b, w, wb = _inputs((M, K), 8, dtype)
    cfg = router.pick_config(M, 8, K, x, router.raw_dot_ok(x, w))
    if cfg["SPLITS"] == 1 and dtype == torch.float32:
        pytest.skip("float32 at this many rows takes no K slices (tl.dot tiles, or one row per program)")
    assert cfg["SPLITS"] > 1                        # the shape reaches the split path
    first = _check(x, g, b, w, wb, dtype, k=3, renormalize=True, gating=gating)
    again = fused_ops.fused_router(x, g, b, w, wb, k=3, renormalize=True, gating=gating)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not router.split_counters(x.device, triton.cdiv(M, cfg["BLOCK_M"])).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])       # the raw dot takes 16-bit x
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("M, K, splits", pick([(40, 1100, 2), (70, 1100, 3)],
                                              [(M, 8320, s) for M in (4097, 8192) for s in (2, 4, 16)]))
def test_raw_dot_k_slices_match_the_reference_on_every_run(dtype, gating, M, K, splits):
    """The raw dot in 64-row blocks at 8 warps with K slices (that end inside a K step): without the
    immediate wait of router.wait_for_dot, a load rewrote the shared-memory slot an asynchronous
    wgmma was still reading, and the weights were off by up to 3e-2, different on each run, on the
    H200. Every row's weights must match the reference (a max, not a norm, so a few bad rows show),
    the same bits on every run, counters back at zero."""
    router = importlib.import_module("fused_ops.router")
    x, g, b, w, wb = _inputs((M, K), 8, dtype)
    config = router.make_config(8, K, router.RouterTiling(True, 64, 128, 8, 6, splits))
    assert config["BLOCK_M"] == 64 and config["SPLITS"] == splits and not config["EVEN_K"]
    up = [t.double() for t in (x, g, b, w, wb)]
    rw, _ = reference.fused_router(*up, k=4, alpha=0.01, gating=gating)
    largest = reference.router_logits(*up, 1e-5, gating).abs().max().item()
    runs = [_check(x, g, b, w, wb, dtype, config=config, k=4, alpha=0.01, gating=gating) for _ in range(3)]
    for weights, indices in runs:
        assert (weights.double() - rw).abs().max().item() < 1e-4 + 2.0 ** -22 * largest
        assert torch.equal(weights, runs[0][0]) and torch.equal(indices, runs[0][1])
    assert not router.split_counters(x.device, triton.cdiv(M, config["BLOCK_M"])).any()


@pytest.mark.parametrize("M", [20, 70])
def test_every_shipped_tuned_tiling_matches_the_reference(M):
    """The tuned entries in fused_ops/configs run only on their GPUs; here each one runs at a small
    K under the interpreter, with both gatings."""
    router = importlib.import_module("fused_ops.router")
    tuning = importlib.import_module("fused_ops.tuning")
    entries = tuning.shipped_entries("fused_router")
    assert entries
    x, g, b, w, wb = _inputs((M, 1100), 8, torch.bfloat16)
    for _, label, entry in entries:
        config = router.make_config(8, 1100, router.tiling_from_json(entry))
        for gating in GATINGS:
            weights, indices = router.launch_fused_router(x, g, b, w, wb, 3, 1.0, 0.01, 1e-5, False, gating,
                                                          config=config)
            rw, ri = reference.fused_router(x.double(), g.double(), b.double(), w.double(), wb.double(), k=3,
                                            alpha=0.01, gating=gating)
            assert rel_err(weights, rw) < TOLERANCE[torch.bfloat16], label
            assert_topk_match(indices, rw, ri, rtol=TOLERANCE[torch.bfloat16])


def test_cached_gate_sums_follow_in_place_updates():
    """The parameter terms (W @ gamma, ||w_e - beta||^2, ...) are cached per version of the gate
    weight and the LN parameters: any in-place change must show in the next call."""
    x, g, b, w, wb = _inputs((40, 64), 8, torch.float32)
    for update in (lambda: None, lambda: w.mul_(2), lambda: g.add_(1), lambda: b.neg_()):
        update()
        for gating in GATINGS:
            _check(x, g, b, w, wb, torch.float32, k=3, gating=gating)


@pytest.mark.parametrize("gating", GATINGS)
def test_wide_expert_rows_fall_back_to_logits_then_unfused_ops(gating):
    x, g, b, w, wb = _inputs((pick(5, 2000), 30), 600, torch.float32)
    _check(x, g, b, w, wb, torch.float32, k=5, temperature=0.5, alpha=0.1, renormalize=True, gating=gating)


def test_errors():
    x, g, b, w, wb = _inputs((3, 16), 8, torch.float32)
    with pytest.raises(ValueError, match="gating"):
        fused_ops.fused_router(x, g, b, w, wb, k=2, gating="cosine")
    with pytest.raises(ValueError, match="k"):
        fused_ops.fused_router(x, g, b, w, wb, k=9)
    with pytest.raises(ValueError, match="temperature"):
        fused_ops.fused_router(x, g, b, w, wb, k=2, temperature=0.0)


@pytest.mark.parametrize("gating", GATINGS)
def test_opcheck(gating):
    x, g, b, w, wb = _inputs((6, 24), 8, torch.float32)
    torch.library.opcheck(torch.ops.fused_ops.fused_router.default,
                          (x, g, b, w, wb, 3, 0.5, 0.01, 1e-5, True, gating))


@pytest.mark.skipif(not ON_GPU, reason="launch counting needs CUDA")
def test_one_launch():
    from torch.profiler import ProfilerActivity, profile
    x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
    fused_ops.fused_router(x, g, b, w, wb, k=4)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fused_ops.fused_router(x, g, b, w, wb, k=4)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "fused_router_kernel" in kernels[0].name, [e.name for e in kernels]
