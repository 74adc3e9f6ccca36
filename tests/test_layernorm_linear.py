"""layernorm_linear against the float64 reference, on every kernel path: the rows kernel (broadcast
and tl.dot tiles, split-K with its finish kernel) and the wide-N kernels with their cached column
sums (float32: the few-rows kernel, or the gemm whole or split, with the rows kernel's finish;
16-bit: the gemm whole after a statistics pass, or split over K with its own finish). Which kernels
ran is recorded, so the case list provably covers each path."""
import importlib
import math

import pytest
import torch

import fused_ops
from fused_ops import reference

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, pick, rand

LN = importlib.import_module("fused_ops.layernorm_linear")
KERNELS = ("layernorm_linear_rows_kernel", "layernorm_linear_finish_kernel", "layernorm_linear_gemm_kernel",
           "layernorm_linear_few_rows_kernel", "layernorm_linear_folded_gemm_kernel", "folded_split_finish_kernel",
           "row_stats_kernel", "weight_sums_kernel")

# (x shape, N, kernels expected; the gemm's weight_sums kernel runs only on a cache miss, so it is
# left out; "gemm" is the float32 few-rows kernel + the finish (up to 16 rows), or the float32 gemm
# (+ the finish where K is split), or the 16-bit stats + folded gemm, or where K is split the folded
# gemm + its finish, see _expected). On CPU the
# interpreter reports 4 SMs, so ~8 programs fill it: that picks the paths below; on a GPU, "rows"
# adds "finish" wherever the grid is too small for the device's SMs.
CASES = [
    ((3, 7), 8, {"rows"}),                       # broadcast tiles, one K step
    ((1, 1), 2, {"rows"}),                       # K = 1: LN(x) = beta exactly
    ((2, 1023), 64, {"rows", "finish"}),         # 2 rows cannot fill the GPU: K split over programs
    ((130, 100), 16, {"rows"}),                  # 16-row blocks: tl.dot tiles
    ((5, 300), 600, {"gemm"}),                   # few rows, wide N: float32's few-rows kernel
    ((2, 512), 600, {"gemm"}),                   # the same, K a whole number of its steps
    ((20, 300), 600, {"gemm"}),                  # 32-row blocks (float32: the gemm from 17 rows)
    ((40, 200), 520, {"gemm"}),                  # gemm, K and N tails
    ((33, 128), 600, {"gemm"}),                  # gemm, K a whole number of steps
    ((0, 16), 8, set()),
    ((2, 3, 50), 7, {"rows"}),                   # leading dims
] + pick([], [
    ((8193, 8320), 8, {"rows"}),                 # 16-row tl.dot tiles, as at M = 8192
    ((32, 8320), 8, {"rows", "finish"}),
    ((1, 8320), 512, {"rows", "finish"}),
    ((8, 8320), 4096, {"rows"}),
    ((4097, 1023), 4096, {"gemm"}),
    ((300, 8320), 1000, {"gemm"}),
    ((1, 8320), 4096, {"rows"}),                 # 16-bit: the gemm's 32 tiles, K split over programs
    ((3, 4001), 1000, {"rows"}),                 # 16-bit: K split, the last slice past K's last step
])
AFFINE = ["gamma, beta, bias", "none", "gamma, bias"]


def _inputs(shape, N, dtype, affine="gamma, beta, bias", mean=0.0, std=1.0):
    K = shape[-1]
    x = (mean + std * torch.randn(*shape, device=DEVICE)).to(dtype)
    g = rand(K, dtype=dtype) if "gamma" in affine else None
    b = rand(K, dtype=dtype) if "beta" in affine else None
    w = rand(N, K, dtype=dtype, scale=K ** -0.5)            # nn.Linear-sized weights: outputs O(1)
    bias = rand(N, dtype=dtype) if "bias" in affine else None
    return x, g, b, w, bias


def _oracle(x, g, b, w, bias):
    up = lambda t: None if t is None else t.double()       # noqa: E731
    return reference.layernorm_linear(x.double(), up(g), up(b), w.double(), up(bias))


class _KernelLog:
    """Wraps the module's kernels to record which ones a call launched."""

    def __init__(self, monkeypatch):
        self.names = set()
        for name in KERNELS:
            monkeypatch.setattr(LN, name, self._spy(getattr(LN, name), name))

    def _spy(self, kernel, name):
        log = self.names

        class Spy:
            def __getitem__(self, grid):
                log.add(name.replace("layernorm_linear_", "").replace("_kernel", ""))
                return kernel[grid]

            def warmup(self, *args, **kwargs):        # compiles only (stats_beside reads the resources)
                return kernel.warmup(*args, **kwargs)
        return Spy()


def _expected(kernels, shape, N, dtype):
    """The case's kernel set on this device and dtype."""
    M = math.prod(shape[:-1])
    if N > LN.ROWS_MAX_N:                                        # wide N: the gemm path at any M
        kernels = {"gemm"}
    if "gemm" in kernels:
        K, device = shape[-1], torch.device(DEVICE)
        if dtype == torch.float32 and M <= LN.FEW_ROWS_MAX_M:
            return {"few_rows", "finish"}
        split = LN.gemm_split(M, N, K, LN.pick_gemm_config(M, dtype, device), device)[0] > 1
        if dtype == torch.float32:
            return {"gemm", "finish"} if split else {"gemm"}
        return {"folded_gemm", "folded_split_finish"} if split else {"row_stats", "folded_gemm"}
    if ON_GPU and kernels == {"rows"}:
        M, K = math.prod(shape[:-1]), shape[-1]
        cfg = LN.rows_config(M, N, K, LN.sm_count(torch.device(DEVICE)), dtype.itemsize)
        blocks = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
        if LN._k_split(blocks, K, cfg["BLOCK_K"], torch.device(DEVICE))[0] > 1:
            return {"rows", "finish"}
    return kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(monkeypatch, dtype, case):
    shape, N, expected = CASES[case]
    x, g, b, w, bias = _inputs(shape, N, dtype, AFFINE[case % len(AFFINE)])
    log = _KernelLog(monkeypatch)
    y = fused_ops.layernorm_linear(x, g, b, w, bias)
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    assert log.names - {"weight_sums"} == _expected(expected, shape, N, dtype)
    assert_close(y, _oracle(x, g, b, w, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, N", [((3, 1023), 8), ((2, 1023), 64), ((130, 100), 16), ((40, 200), 520),
                                      ((5, 1000), 600)]
                         + pick([], [((64, 8320), 4096), ((4097, 8320), 8)]))
def test_large_mean_tiny_spread(dtype, shape, N):
    """x = 1000 + small noise: E[x^2] - E[x]^2 and x @ W^T lose every digit in fp32 here; the pivot
    shift keeps fp32 at fp32 accuracy. 16-bit x cannot hold 1000 + 0.01 noise: spread 1 there, which
    is |mean| / std ~ 2^10, past what bf16 data can carry (2^9), for the 16-bit gemm's unshifted
    accumulation (module docstring: loss ~2^-24 sqrt(K / BLOCK_K) |mean| / std, ~1e-3 here)."""
    std = 0.01 if dtype == torch.float32 else 1.0
    x, g, b, w, bias = _inputs(shape, N, dtype, mean=1000.0, std=std)
    assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), _oracle(x, g, b, w, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, N", [((3, 3000), 8), ((2, 1023), 64), ((130, 600), 16), ((40, 1000), 520),
                                      ((5, 1000), 600)])
def test_pivot_far_from_the_mean(dtype, shape, N):
    """The pivot is the mean of a row's first K step; shifting the first quarter of each row puts it
    far from the row mean, so every term in d = mean - pivot must be right."""
    x, g, b, w, bias = _inputs(shape, N, dtype)
    x[:, : shape[-1] // 4] += 3.0
    assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), _oracle(x, g, b, w, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, N", [((3, 300), 8), ((40, 200), 520), ((5, 300), 600)])
def test_constant_rows(dtype, shape, N):
    """var = 0: rstd = 1/sqrt(eps) amplifies any rounding of x - mean; the output must be W @ beta + b."""
    x, g, b, w, bias = _inputs(shape, N, dtype)
    x[0] = 1234.5
    x[-1] = -3.0
    y = fused_ops.layernorm_linear(x, g, b, w, bias)
    expected = (w.double() @ b.double() + bias.double()).to(dtype)
    assert_close(y[0], expected, dtype)
    assert_close(y[-1], expected, dtype)
    assert_close(y, _oracle(x, g, b, w, bias), dtype)


SPLIT_TILE = LN.GemmConfig(64, 256, 64, 8, 8, 3)     # 2 column blocks at N = 300: K split on CPU's 4 SMs too
SPLIT_TILE_FP32 = LN.GemmConfig(64, 256, 32, 8, 8, 3)  # the same in the shared memory of 4-byte tiles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K", [(3, 1000), (40, 200)])
def test_split_gemm(monkeypatch, dtype, M, K):
    """The gemm with K split over programs (16-bit: the finish reads the rows' statistics and adds
    the parts; float32: the slices' row sums go beside their parts): every element of a poisoned y
    written, the reference's answer, a constant row (y = W @ beta + bias) and a row with a large mean
    included."""
    x, g, b, w, bias = _inputs((M, K), 300, dtype)
    x[0] = 1234.5
    x[-1] += 100.0
    tile = SPLIT_TILE_FP32 if dtype == torch.float32 else SPLIT_TILE
    assert LN.gemm_split(M, 300, K, tile, x.device)[0] > 1
    log = _KernelLog(monkeypatch)
    y = torch.full((M, 300), float("nan"), dtype=dtype, device=DEVICE)
    LN._launch_gemm(x, g, b, w, bias, y, 1e-5, tile)
    split_kernels = {"gemm", "finish"} if dtype == torch.float32 else {"folded_gemm", "folded_split_finish"}
    assert log.names - {"weight_sums"} == split_kernels
    assert_close(y[0], (w.double() @ b.double() + bias.double()).to(dtype), dtype)
    assert_close(y, _oracle(x, g, b, w, bias), dtype)


BESIDE_TILE = LN.GemmConfig(64, 128, 64, 8, 4, 3)   # 5 row blocks at 300 rows (16 at 1000), the last partial


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beside", [False, True])
def test_statistics_pass_before_or_beside_the_gemm(monkeypatch, dtype, beside):
    """The 16-bit gemm after its statistics pass, or with the pass beside it (one program an SM
    counting finished rows, each tile waiting for its row block's count): every element of a
    poisoned y written, the reference's answer, a constant row and a row with a large mean included;
    the two orders agree to rounding (the pass's warps sum in another order)."""
    M, K, N = pick(300, 1000), 200, 600           # tiles enough that K is not split (gemm_split)
    x, g, b, w, bias = _inputs((M, K), N, dtype)
    x[0] = 1234.5
    x[-1] += 100.0
    assert LN.gemm_split(M, N, K, BESIDE_TILE, x.device)[0] == 1
    log = _KernelLog(monkeypatch)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    LN._launch_gemm(x, g, b, w, bias, y, 1e-5, BESIDE_TILE, beside=beside)
    assert log.names - {"weight_sums"} == {"row_stats", "folded_gemm"}
    assert_close(y[0], (w.double() @ b.double() + bias.double()).to(dtype), dtype)
    assert_close(y, _oracle(x, g, b, w, bias), dtype)
    other = torch.full_like(y, float("nan"))
    LN._launch_gemm(x, g, b, w, bias, other, 1e-5, BESIDE_TILE, beside=not beside)
    assert_close(other, y, dtype)


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() != (9, 0), reason="sm_90's register counts")
def test_statistics_pass_goes_beside_only_the_tiles_that_leave_room():
    """On sm_90 a 128 x 256 tile (176 registers a thread) leaves an SM room for a statistics program,
    and 256 x 128 (248-250) does not: stats_beside must read both from the compiled kernels (a
    Triton whose kernels stopped reporting them would make every answer False)."""
    M, K, N = 256, 8320, 4096
    x, g, b, w, bias = _inputs((M, K), N, torch.bfloat16)
    sums, folded = LN.weight_sums(w, g, b, bias)
    stats = torch.empty((2, M), device=DEVICE)
    y = torch.empty((M, N), dtype=x.dtype, device=DEVICE)
    wide, tall = LN.GemmConfig(128, 256, 64, 8, 8, 4), LN.GemmConfig(256, 128, 64, 8, 8, 4)
    assert LN.stats_beside(x, folded, stats, sums, y, 1e-5, wide)
    assert not LN.stats_beside(x, folded, stats, sums, y, 1e-5, tall)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9)])
def test_statistics_pass_goes_first_before_sm_90(monkeypatch, capability):
    """Before sm_90 there is no programmatic dependent launch (the statistics kernel's griddepcontrol
    does not assemble for sm_80 or sm_89): the pass goes first, and nothing is compiled to ask."""
    monkeypatch.setattr(LN, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(LN.row_stats_kernel, "warmup", None)        # a compile would fail the call
    x = torch.ones(4, 8)
    assert not LN.stats_beside(x, None, None, None, None, 1e-5, LN.GemmConfig(128, 256, 64, 8, 8, 4))


@pytest.mark.skipif(not ON_GPU, reason="two kernels running at once need a GPU")
def test_gemm_tiles_wait_for_statistics_written_after_them():
    """The waiting gemm launched first on one stream, its statistics (poisoned until then) computed
    later on another: every tile must wait for its row block's count. The grid's 25 tiles leave
    most SMs free for the statistics programs. Every kernel runs once in the library's order first:
    a first launch loads its module, which may wait for the device, and so for the waiting gemm (a
    run without this warm-up hung)."""
    M, K, N = 300, 8320, 600
    x, g, b, w, bias = _inputs((M, K), N, torch.bfloat16)
    sums, folded = LN.weight_sums(w, g, b, bias)
    stats = torch.empty((2, M), device=DEVICE)
    y = torch.empty((M, N), dtype=x.dtype, device=DEVICE)
    late = torch.cuda.Stream()

    def statistics(counts):
        with torch.cuda.stream(late):
            torch.cuda._sleep(20_000_000)                # ~10 ms of GPU clock before the pass starts
            LN.launch_row_stats(x, stats, 1e-5, counts, BESIDE_TILE.block_m)

    counts = LN.beside_counts(M, BESIDE_TILE.block_m, x.device)
    torch.cuda.synchronize()
    statistics(counts)
    late.synchronize()
    LN.launch_folded_gemm(x, folded, stats, sums, y, BESIDE_TILE, counts=counts)
    counts.zero_()
    stats.fill_(float("nan"))
    y.fill_(float("nan"))
    torch.cuda.synchronize()
    LN.launch_folded_gemm(x, folded, stats, sums, y, BESIDE_TILE, counts=counts)
    statistics(counts)
    torch.cuda.synchronize()
    assert_close(y, _oracle(x, g, b, w, bias), torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # the interpreter's numpy: inf - inf
@pytest.mark.parametrize("shape, N", [((5, 100), 8), ((40, 200), 520)])
def test_non_finite_rows_stay_in_their_rows(shape, N):
    """NaN or +-inf anywhere in a row (the pivot's first step included) makes that row NaN, as
    LayerNorm does; the other rows are untouched."""
    x, g, b, w, bias = _inputs(shape, N, torch.float32)
    x[1, 37] = float("nan")
    x[2, 0] = float("inf")
    x[3, 77] = float("-inf")
    y = fused_ops.layernorm_linear(x, g, b, w, bias)
    assert torch.isnan(y[1:4]).all()
    assert_close(y, _oracle(x, g, b, w, bias), torch.float32)     # NaN pattern equal, the rest close


@pytest.mark.parametrize("M, N", [(33, 24), (33, 520), (5, 520)])      # rows kernel, float32 gemm, few rows
def test_noncontiguous_inputs(M, N):
    K = 70
    x = rand(K, M).t()
    g, b = rand(2 * K)[::2], rand(K)
    w = rand(K, N, scale=K ** -0.5).t()
    bias = rand(2 * N)[1::2]
    assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), _oracle(x, g, b, w, bias), torch.float32)


def test_gemm_column_sums_follow_in_place_updates():
    """The gemm's W @ gamma and W @ beta + b are cached per weight version: any in-place change of
    the four tensors must show in the next call, and fresh inference tensors are never cached."""
    x, g, b, w, bias = _inputs((40, 64), 520, torch.float32)
    for update in (lambda: None, lambda: w.mul_(2), lambda: g.add_(1), lambda: b.neg_(), lambda: bias.add_(3)):
        update()
        assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), _oracle(x, g, b, w, bias), torch.float32)
    with torch.inference_mode():
        w2 = w.clone()
        assert_close(fused_ops.layernorm_linear(x, g, b, w2, bias), _oracle(x, g, b, w2, bias), torch.float32)
        w2.mul_(-1)
        assert_close(fused_ops.layernorm_linear(x, g, b, w2, bias), _oracle(x, g, b, w2, bias), torch.float32)


def test_eps():
    x, g, b, w, bias = _inputs((5, 40), 8, torch.float32, std=0.01)
    y = fused_ops.layernorm_linear(x, g, b, w, bias, eps=0.1)
    assert_close(y, reference.layernorm_linear(x.double(), g.double(), b.double(), w.double(), bias.double(),
                                               eps=0.1), torch.float32)


def test_errors():
    x, g, b, w, bias = _inputs((3, 16), 8, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.layernorm_linear(x, g, b, rand(8, 15), bias)
    with pytest.raises(TypeError, match="ln_weight"):
        fused_ops.layernorm_linear(x, g.half(), b, w, bias)
    with pytest.raises(ValueError, match="eps"):
        fused_ops.layernorm_linear(x, g, b, w, bias, eps=0.0)


@pytest.mark.parametrize("N, affine", [(8, "gamma, beta, bias"), (520, "none")])
def test_opcheck(N, affine):
    x, g, b, w, bias = _inputs((20, 32), N, torch.float32, affine)
    torch.library.opcheck(torch.ops.fused_ops.layernorm_linear.default, (x, g, b, w, bias, 1e-5))


@pytest.mark.skipif(not ON_GPU, reason="tf32 is a GPU mode")
def test_tf32_only_when_allowed():
    """The float32 gemm's dot: three tf32 products (float32's accuracy) unless torch allows tf32,
    then one (~1e-3). The float32 tolerance, 1e-5, fails a single tf32 product here."""
    x, g, b, w, bias = _inputs((300, 1023), 1000, torch.float32)
    ref = _oracle(x, g, b, w, bias)
    assert LN.gemm_precision(torch.float32, x.device) == "tf32x3"
    assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), ref, torch.float32)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert LN.gemm_precision(torch.float32, x.device) == "tf32"
        assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), ref, torch.float32,
                     table={torch.float32: 1e-3})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.skipif(not ON_GPU, reason="tf32 is a GPU mode")
def test_tf32_setting_reaches_a_repeated_call():
    """A launch plan recorded with tf32 allowed is not replayed once it is not: float32 accuracy."""
    x, g, b, w, bias = _inputs((300, 1023), 1000, torch.float32)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fused_ops.layernorm_linear(x, g, b, w, bias)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close(fused_ops.layernorm_linear(x, g, b, w, bias), _oracle(x, g, b, w, bias), torch.float32)
