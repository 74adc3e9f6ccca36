"""Launch plans (fused_ops/launch_plans.py): a repeated eager fused_router or 16-bit layernorm_linear
gemm call launches the compiled kernels it kept, and anything that would change the launch
(parameters changed in place or given new storage, x at another alignment, another stream, graph
capture, inference-mode parameters) must give the reference's answer, through a new plan or none."""
import importlib

import pytest
import torch

import fused_ops
from fused_ops import router

import test_layernorm_linear as ln_tests
from conftest import ON_GPU, assert_close
from test_router import _check, _inputs

LN = importlib.import_module("fused_ops.layernorm_linear")     # the module; fused_ops.layernorm_linear is the op

pytestmark = pytest.mark.skipif(not ON_GPU, reason="plans exist on CUDA only (not under the interpreter)")

KW = dict(k=4, temperature=0.7, alpha=0.01)


def _plans() -> int:
    return len(router._PLANS._plans)


def _call(x, g, b, w, wb):
    return fused_ops.fused_router(x, g, b, w, wb, **KW)


@pytest.mark.parametrize("M", [1, 32, 300])
@pytest.mark.parametrize("gating", ["softmax", "laplace"])
def test_a_repeated_call_takes_its_plan_and_the_same_answer(M, gating):
    x, g, b, w, wb = _inputs((M, 8320), 8, torch.bfloat16)
    router._PLANS.clear()
    first = _check(x, g, b, w, wb, torch.bfloat16, gating=gating, **KW)
    assert _plans() == 1
    for _ in range(3):                      # the plan's scratch and counters are reused
        again = _check(x, g, b, w, wb, torch.bfloat16, gating=gating, **KW)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert _plans() == 1


def test_parameters_changed_in_place_or_given_new_storage():
    x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
    _check(x, g, b, w, wb, torch.bfloat16, **KW)
    for update in (lambda: w.mul_(-1), lambda: g.add_(0.5), lambda: wb.zero_()):
        update()
        _check(x, g, b, w, wb, torch.bfloat16, **KW)
    b.data = torch.randn_like(b)                 # new storage, version unchanged
    _check(x, g, b, w, wb, torch.bfloat16, **KW)


def test_x_at_another_alignment_and_new_x_each_call():
    x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
    _check(x, g, b, w, wb, torch.bfloat16, **KW)
    flat = torch.randn(32 * 8320 + 1, device="cuda").to(torch.bfloat16)
    _check(flat[1:].view(32, 8320), g, b, w, wb, torch.bfloat16, **KW)      # 2 bytes off 16
    for _ in range(3):
        _check(torch.randn_like(x), g, b, w, wb, torch.bfloat16, **KW)


def test_another_stream_gets_its_own_plan():
    x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
    router._PLANS.clear()
    expected = _call(x, g, b, w, wb)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [_call(x, g, b, w, wb) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(side)
    assert _plans() == 2
    for weights, indices in got:
        assert torch.equal(weights, expected[0]) and torch.equal(indices, expected[1])


def test_graph_capture_after_a_plan_and_eager_calls_after_replays():
    x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
    expected = _call(x, g, b, w, wb)
    _call(x, g, b, w, wb)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _call(static_x, g, b, w, wb)                 # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=side):
            out = _call(static_x, g, b, w, wb)
    torch.cuda.current_stream().wait_stream(side)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    eager = _call(fresh, g, b, w, wb)                # plan launch beside the graph's own counters
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_inference_mode_parameters_keep_no_plan():
    with torch.inference_mode():
        x, g, b, w, wb = _inputs((32, 8320), 8, torch.bfloat16)
        router._PLANS.clear()
        for _ in range(2):
            _check(x, g, b, w, wb, torch.bfloat16, **KW)
    assert _plans() == 0


def _ln_plans() -> int:
    return sum(len(p._plans) for p in LN.PLAN_TABLES)


def _ln_check(x, g, b, w, bias):
    y = fused_ops.layernorm_linear(x, g, b, w, bias)
    assert_close(y, ln_tests._oracle(x, g, b, w, bias), x.dtype)
    return y


BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("M, K, N, affine, dtype", [
    (256, 8320, 4096, "gamma, beta, bias", BF16), (300, 8320, 1024, "gamma, bias", BF16),
    (8, 8320, 4096, "gamma, beta, bias", BF16), (5, 1023, 64, "none", BF16),
    (8, 8320, 4096, "gamma, beta, bias", FP32), (1024, 200, 4096, "gamma, bias", FP32)])
def test_layernorm_linear_plans(plan_launches, M, K, N, affine, dtype):
    """The rows kernel (and its finish where K is split), the 16-bit gemm path's statistics pass and
    gemm (256 x 4096) or its gemm split over K and finish (300 and 8 rows), float32's few-rows kernel
    and finish (8 rows) and its gemm whole (1024), keep plans: repeats launch them (same bits), and the
    reference's answer for fresh x, parameters changed in place or given new storage, and misaligned
    x (a plan of its own)."""
    x, g, b, w, bias = ln_tests._inputs((M, K), N, dtype, affine)
    for plans in LN.PLAN_TABLES:
        plans.clear()
    first = _ln_check(x, g, b, w, bias)
    kernels = ln_tests._expected({"rows"}, (M, K), N, dtype)      # the path this shape takes
    built = _ln_plans()
    assert built == len(kernels) and not plan_launches
    for _ in range(3):
        assert torch.equal(fused_ops.layernorm_linear(x, g, b, w, bias), first)
    assert _ln_plans() == built and len(plan_launches) == 3 * built
    _ln_check(torch.randn_like(x), g, b, w, bias)
    for t, update in ((w, lambda t: t.mul_(-1)), (g, lambda t: t.add_(0.5)), (bias, lambda t: t.zero_())):
        if t is not None:
            update(t)
            _ln_check(x, g, b, w, bias)
    if b is not None:
        b.data = torch.randn_like(b)             # new storage, version unchanged
        _ln_check(x, g, b, w, bias)
    flat = torch.randn(M * K + 1, device="cuda").to(dtype)
    _ln_check(flat[1:].view(M, K), g, b, w, bias)                           # off 16 bytes: no TMA
    assert _ln_plans() == 2 * built


def test_layernorm_linear_graph_capture_after_plans():
    x, g, b, w, bias = ln_tests._inputs((256, 8320), 1024, torch.bfloat16)
    expected = _ln_check(x, g, b, w, bias)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_ops.layernorm_linear(static_x, g, b, w, bias)
        with torch.cuda.graph(graph, stream=side):
            out = fused_ops.layernorm_linear(static_x, g, b, w, bias)
    torch.cuda.current_stream().wait_stream(side)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    eager = fused_ops.layernorm_linear(fresh, g, b, w, bias)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("beside", [False, True])
def test_layernorm_linear_statistics_beside_in_a_graph(beside):
    """The 16-bit gemm path, its statistics pass before or beside the gemm (zeroed counts and a
    programmatic dependent launch, captured), replayed on fresh x: the eager answer, bit for bit."""
    x, g, b, w, bias = ln_tests._inputs((1000, 8320), 4096, torch.bfloat16)
    cfg = LN.pick_gemm_config(1000, x.dtype, x.device)

    def call(x):
        y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        LN._launch_gemm(x, g, b, w, bias, y, 1e-5, cfg, beside=beside)
        return y

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(static_x)
        with torch.cuda.graph(graph, stream=side):
            out = call(static_x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        eager = call(fresh)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert_close(out, ln_tests._oracle(fresh, g, b, w, bias), torch.bfloat16)
