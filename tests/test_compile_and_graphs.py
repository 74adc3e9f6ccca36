"""torch.compile(fullgraph=True) sees every op through its fake implementation; on a GPU the whole
FuseMoE forward and the MaxSim ops are captured in a CUDA graph and replayed on new inputs."""
import pytest
import torch

import fused_ops
from fused_ops import FuseMoE, FuseMoEConfig

from conftest import DEVICE, ON_GPU, assert_close, pick, rand

CONFIG = pick(FuseMoEConfig(d_in=48, d_hidden=32, d_out=16, num_experts=4, top_k=2),
              FuseMoEConfig(d_in=1024, d_hidden=512, d_out=256, num_experts=8, top_k=4))
DTYPE = pick(torch.float32, torch.bfloat16)


def _module(gating="softmax"):
    import dataclasses
    torch.manual_seed(0)
    return FuseMoE(dataclasses.replace(CONFIG, gating=gating), backend="triton", device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("gating", ["softmax", "laplace"])
def test_compiled_fusemoe_matches_eager_without_graph_breaks(gating):
    torch._dynamo.reset()
    m = _module(gating)
    x = rand(pick(5, 64), CONFIG.d_in, dtype=DTYPE)
    compiled = torch.compile(m, fullgraph=True)
    with torch.inference_mode():
        y, (w, i) = compiled(x, return_routing=True)
        y_eager, (w_eager, i_eager) = m(x, return_routing=True)
    assert torch.equal(i, i_eager)
    assert_close(y, y_eager, DTYPE)


def test_compiled_maxsim_ops():
    torch._dynamo.reset()
    Q, D = rand(2, 5, 16), rand(7, 9, 16)
    dl = torch.tensor([9, 0, 3, 1, 9, 4, 2], device=DEVICE)
    f = torch.compile(lambda Q, D, dl: (fused_ops.maxsim(Q, D, d_lengths=dl),
                                        fused_ops.maxsim_topk(Q, D, 3, d_lengths=dl)), fullgraph=True)
    s, (ts, ti) = f(Q, D, dl)
    assert torch.equal(s, fused_ops.maxsim(Q, D, d_lengths=dl))
    assert torch.equal(ti, fused_ops.maxsim_topk(Q, D, 3, d_lengths=dl)[1])


def _capture(fn, *static_inputs):
    """Warm up on a side stream (compiles kernels, fills caches), then capture one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tokens", [1, 32, 300])
def test_fusemoe_forward_in_a_cuda_graph(tokens):
    m = _module()
    x_static = rand(tokens, CONFIG.d_in, dtype=DTYPE)
    with torch.inference_mode():
        graph, (y_static, (w_static, i_static)) = _capture(lambda x: m(x, return_routing=True), x_static)
        for _ in range(3):                                   # replay on fresh inputs
            x_new = rand(tokens, CONFIG.d_in, dtype=DTYPE)
            x_static.copy_(x_new)
            graph.replay()
            y, (w, i) = m(x_new, return_routing=True)
            assert torch.equal(i_static, i)
            assert torch.equal(y_static, y)                  # the default combine is deterministic


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_maxsim_in_a_cuda_graph():
    Q, D = rand(4, 32, 128, dtype=torch.bfloat16), rand(500, 64, 128, dtype=torch.bfloat16)
    dl = torch.randint(0, 65, (500,), device=DEVICE)
    graph, (s_static, (ts_static, ti_static)) = _capture(
        lambda Q, D, dl: (fused_ops.maxsim(Q, D, d_lengths=dl), fused_ops.maxsim_topk(Q, D, 10, d_lengths=dl)),
        Q, D, dl)
    for _ in range(3):
        Q.copy_(rand(*Q.shape, dtype=Q.dtype))
        D.copy_(rand(*D.shape, dtype=D.dtype))
        dl.copy_(torch.randint(0, 65, (500,), device=DEVICE))
        graph.replay()
        assert torch.equal(s_static, fused_ops.maxsim(Q, D, d_lengths=dl))
        assert torch.equal(ti_static, fused_ops.maxsim_topk(Q, D, 10, d_lengths=dl)[1])
