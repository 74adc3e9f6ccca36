"""Test mode: the real Triton kernels on CUDA when a GPU is present, else on CPU through the
Triton interpreter (TRITON_INTERPRET must be set before triton is first imported)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import zlib

import torch  # torch does not import triton, so the flag below still takes effect

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# relative-RMSE bounds ||out - ref|| / ||ref|| per input dtype (GUIDE.md, Testing)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def compiler_env() -> dict:
    """This environment without TRITON_INTERPRET: for the subprocesses that compile real kernels."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def compiled_json(code: str):
    """What Python `code`, run in such a subprocess, prints as JSON."""
    return json.loads(subprocess.run([sys.executable, "-c", code], env=compiler_env(), capture_output=True, text=True,
                                     check=True).stdout)


class OfflineCompile:
    """`python -m fused_ops.offline --json` (without TRITON_INTERPRET) in a subprocess, started once the
    tests that read its reports are collected, so that its minutes of compiling run beside the
    interpreted tests instead of before the offline ones."""

    def __init__(self):
        self.proc = self.out = self.err = None

    def start(self) -> None:
        if self.proc is None:
            self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            self.proc = subprocess.Popen([sys.executable, "-m", "fused_ops.offline", "--json"], env=compiler_env(),
                                         text=True, stdout=self.out, stderr=self.err, start_new_session=True)

    def reports(self) -> list:
        self.start()
        if self.proc.wait():
            self.err.seek(0)
            raise RuntimeError(f"fused_ops.offline exited with {self.proc.returncode}:\n{self.err.read()[-4000:]}")
        self.out.seek(0)
        return json.loads(self.out.read())

    def stop(self) -> None:
        """Ends the compile (its worker processes too) if the run ends before it does."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


OFFLINE = OfflineCompile()


def pytest_collection_modifyitems(config, items):
    """The tests that read the offline compile's reports run last, so that the compile overlaps all
    the others (a stable sort: every other order is kept)."""
    items.sort(key=lambda item: "offline_reports" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    if any("offline_reports" in getattr(item, "fixturenames", ()) for item in session.items):
        OFFLINE.start()


def pytest_unconfigure(config):
    OFFLINE.stop()


@pytest.fixture
def plan_launches(monkeypatch):
    """Counts the launches of kept kernels (and still makes them)."""
    from fused_ops import launch_plans              # after the interpreter flag above
    launched = []
    launch = launch_plans.Plan.launch

    def counted(self, *tensors):
        launched.append(self)
        launch(self, *tensors)
    monkeypatch.setattr(launch_plans.Plan, "launch", counted)
    return launched


def pick(cpu, gpu):
    """Small sizes under the interpreter, larger ones on a GPU."""
    return gpu if ON_GPU else cpu


def rand(*shape, dtype=torch.float32, scale=1.0, device=DEVICE):
    """Fresh random input (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or -1 for ints) so an unwritten element cannot pass."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs from the reference"
    finite = torch.isfinite(ref)
    assert torch.equal(out[~finite].nan_to_num(), ref[~finite].nan_to_num()), "inf pattern differs"
    d, r = out[finite], ref[finite]
    denom = r.norm().item()
    return (d - r).norm().item() / denom if denom > 0 else (d - r).norm().item()


def assert_close(out, ref, dtype, table=TOLERANCE):
    err = rel_err(out, ref)
    assert err < table[dtype], f"relative error {err:.3e} >= {table[dtype]:.0e} for {dtype}"


def assert_topk_match(indices, values_ref, indices_ref, rtol=1e-6):
    """Indices must equal the reference's, except within groups whose reference values tie
    (within rounding): there the selected sets of near-equal values must agree in value."""
    idx = indices.long().cpu()
    ridx = indices_ref.long().cpu()
    v = values_ref.double().cpu()
    mismatch = idx != ridx
    if not mismatch.any():
        return
    # a mismatch is allowed only where the reference's value at that slot ties with a neighbour
    scale = v.abs().clamp_min(1e-30)
    tie_prev = torch.zeros_like(mismatch)
    tie_next = torch.zeros_like(mismatch)
    tie_prev[..., 1:] = (v[..., 1:] - v[..., :-1]).abs() <= rtol * scale[..., 1:]
    tie_next[..., :-1] = (v[..., :-1] - v[..., 1:]).abs() <= rtol * scale[..., :-1]
    bad = mismatch & ~(tie_prev | tie_next)
    assert not bad.any(), f"{int(bad.sum())} top-k indices differ from the reference away from ties"


@pytest.fixture(autouse=True)
def _seed(request):
    # a different stream per test, the same on every run (crc32, unlike hash(), is not salted)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
