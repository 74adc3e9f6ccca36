"""Every shipped kernel config compiles for sm_90, sm_100 and sm_120, fits the target's shared
memory per block, spills nothing, and (where it has dots) uses the target's matrix instructions.

The compiler needs real (not interpreted) kernels, so the builds run in one subprocess without
TRITON_INTERPRET; the tests read its reports.
"""
import json
import os
import subprocess
import sys

import pytest

from fused_ops import offline

BUILDS = offline.all_builds()
CASES = [(b, cc) for b in BUILDS for cc in b.targets]


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fused_ops.offline", "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return {(r["name"], r["cc"]): r for r in json.loads(out)}


@pytest.mark.parametrize("build, cc", CASES, ids=[f"{b.name}-sm_{cc}" for b, cc in CASES])
def test_compiles_fits_and_does_not_spill(reports, build, cc):
    r = reports[(build.name, cc)]
    assert not r["notes"], f"compile failed: {r['notes']}"
    assert r["shared"] <= offline.SHARED_LIMIT[cc], f"{r['shared']} B shared > sm_{cc} limit"
    assert r["stack"] == 0 and r["local"] == 0, f"spills: STACK {r['stack']}, LOCAL {r['local']}"
    assert r["registers"] > 0
    if build.uses_dot:
        assert r["dot_instruction"] == offline.DOT_INSTRUCTION[cc], \
            f"expected {offline.DOT_INSTRUCTION[cc]} in the PTX for sm_{cc}"


def test_every_op_module_lists_its_builds():
    names = {b.kernel.__name__ for b in BUILDS}
    assert {"softmax_laplace_rows_kernel", "softmax_laplace_online_kernel", "topk_gating_kernel"} <= names
