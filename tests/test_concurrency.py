"""Ops called from several threads (and, on a GPU, several CUDA streams) at once give the same
results as serial calls, including the first calls that compile kernels and fill config caches."""
import threading

import torch

import fused_ops

from conftest import DEVICE, ON_GPU


def _workloads():
    g = torch.Generator().manual_seed(7)
    work = []
    for n in (5, 33, 70):
        x = (torch.randn(9, n, generator=g) * 2).to(DEVICE)
        w = torch.randn(6, n, generator=g).to(DEVICE)
        work.append(lambda x=x: fused_ops.softmax_laplace(x, temperature=0.5, alpha=0.01))
        work.append(lambda x=x: fused_ops.topk_gating(x.softmax(-1), 3)[1])
        work.append(lambda x=x, w=w: fused_ops.fused_router(x, None, None, w, None, k=2)[1])
        work.append(lambda x=x, w=w: fused_ops.layernorm_linear(x, None, None, w))
        Q, D = torch.randn(2, 4, n, generator=g).to(DEVICE), torch.randn(5, 7, n, generator=g).to(DEVICE)
        work.append(lambda Q=Q, D=D: fused_ops.maxsim(Q, D))
        w1, w2 = torch.randn(3, 16, n, generator=g).to(DEVICE), torch.randn(3, 8, 16, generator=g).to(DEVICE)
        idx = torch.randint(0, 3, (9, 2), generator=g).to(torch.int32).to(DEVICE)
        work.append(lambda x=x, w1=w1, w2=w2, idx=idx: fused_ops.moe_experts(
            x, torch.ones(9, 2, device=DEVICE), idx, w1, None, w2, None))
    return work


def _run(fn, stream):
    if stream is None:
        return fn()
    with torch.cuda.stream(stream):
        out = fn()
    stream.synchronize()
    return out


def test_threads_and_streams_match_serial_results(monkeypatch):
    if not ON_GPU:
        # Triton's interpreter keeps global launch state and is not thread-safe; on CPU the ops
        # take the plain-torch path, whose Python layers (checks, custom-op dispatch) this tests
        monkeypatch.setattr(fused_ops._runtime, "INTERPRET", False)
    work = _workloads()
    results = [None] * len(work)
    errors = []

    def worker(offset):
        stream = torch.cuda.Stream() if ON_GPU else None
        for j in range(offset, len(work), 4):
            try:
                results[j] = _run(work[j], stream)
            except Exception as exc:          # surfaced below with its index
                errors.append((j, exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, fn in enumerate(work):
        assert torch.equal(results[j], fn()), f"workload {j} differs between threaded and serial runs"
