"""Every shipped kernel config compiles for sm_90, sm_100, sm_120 and sm_80 (the generic family), fits
the target's shared memory per block, spills nothing inside a loop, has no shared-memory slot race
(offline.BuildReport.fits), and (where it has dots) uses the target's matrix instructions.

The compiler needs real (not interpreted) kernels, so the builds run in one subprocess without
TRITON_INTERPRET, which conftest.OFFLINE starts as soon as the tests are collected (it compiles
beside the interpreted tests); the tests read its reports.
"""

import importlib

import pytest

from conftest import OFFLINE, compiled_json
from fused_ops import moe, offline, tuning

LN = importlib.import_module("fused_ops.layernorm_linear")
MS = importlib.import_module("fused_ops.maxsim")
ROUTER = importlib.import_module("fused_ops.router")
SOFTMAX = importlib.import_module("fused_ops.softmax")
TOPK = importlib.import_module("fused_ops.topk")

BUILDS = offline.all_builds()
CASES = [(b, cc) for b in BUILDS for cc in b.targets]


@pytest.fixture(scope="module")
def offline_reports():
    return {(r["name"], r["cc"]): r for r in OFFLINE.reports()}


@pytest.mark.parametrize("build, cc", CASES, ids=[f"{b.name}-sm_{cc}" for b, cc in CASES])
def test_compiles_fits_and_does_not_spill_in_loops(offline_reports, build, cc):
    r = offline_reports[(build.name, cc)]
    assert not r["notes"], f"compile failed: {r['notes']}"
    assert r["shared"] <= offline.SHARED_LIMIT[cc], f"{r['shared']} B shared > sm_{cc} limit"
    assert r["local"] == 0 and r["loop_spills"] == 0, \
        f"spills: {r['loop_spills']} spill instructions in loops (STACK {r['stack']}, LOCAL {r['local']})"
    assert not r["slot_races"], f"an asynchronous wgmma shares buffers {r['slot_races']} with register loads"
    assert r["registers"] > 0
    if build.uses_dot:
        assert r["dot_instruction"] == offline.DOT_INSTRUCTION[cc], \
            f"expected {offline.DOT_INSTRUCTION[cc]} in the PTX for sm_{cc}"


def test_every_op_module_lists_its_builds():
    names = {b.kernel.__name__ for b in BUILDS}
    assert {"softmax_laplace_rows_kernel", "softmax_laplace_online_kernel", "topk_gating_kernel"} <= names


def _launches(kernel, entry, bucket) -> list:
    """(kernel, constexprs that must match, num_warps, num_stages[, register cap]) of each launch an
    entry makes."""
    if kernel == "moe_experts":
        cfg = moe.config_from_json(entry)
        return [(k, dict(BLOCK_M=cfg.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m), g.num_warps,
                 g.num_stages) for k, g in ((moe.moe_gemm1_kernel, cfg.gemm1), (moe.moe_gemm2_kernel, cfg.gemm2))]
    if kernel == "layernorm_linear":
        cfg = LN.gemm_from_json(entry)
        return [(LN.layernorm_linear_folded_gemm_kernel, LN.gemm_constexprs(cfg), cfg.num_warps, None)]
    if kernel == "fused_router":
        cfg = dict(ROUTER.make_config(8, 8320, ROUTER.tiling_from_json(entry)))
        warps = cfg.pop("num_warps")
        cfg.pop("k_chunk")
        return [(ROUTER.fused_router_kernel, cfg, warps, None)]
    if kernel == "softmax_laplace":
        cfg = SOFTMAX.config_from_json(entry)
        if SOFTMAX.is_online(bucket):
            return [(SOFTMAX.softmax_laplace_online_kernel, dict(BLOCK_N=cfg.block_n), cfg.num_warps, None)]
        return [(SOFTMAX.softmax_laplace_rows_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg.num_warps,
                 None)]
    if kernel == "topk_gating":
        cfg = TOPK.config_from_json(entry)
        block_e = TOPK.bucket_shape(bucket)[1]
        return [(TOPK.topk_gating_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_E=block_e), cfg.num_warps, None)]
    tiling = MS.tiling_from_json(entry)
    dtype, dim = MS.bucket_family(bucket)
    return [(MS.maxsim_kernel, dict(DIM=dim, BLOCK_Q=tiling.block_q, BLOCK_D=tiling.block_d, TOPK=topk),
             tiling.num_warps, tiling.num_stages, tiling.max_registers) for topk in (False, True)]


SHIPPED = [(kernel, targets, stem, bucket, entry)
           for kernel in ("moe_experts", "layernorm_linear", "maxsim", "maxsim_topk", "fused_router", "softmax_laplace",
                          "topk_gating")
           for targets, stem, bucket, entry in tuning.shipped_buckets(kernel)]


@pytest.mark.parametrize("kernel, targets, stem, bucket, entry", SHIPPED,
                         ids=[f"{k}-{stem}-{bucket}" for k, _, stem, bucket, _ in SHIPPED])
def test_every_shipped_json_entry_is_built_for_its_family(kernel, targets, stem, bucket, entry):
    """Each launch a shipped entry makes is among the builds, for every target of its file's family
    (so test_compiles_fits_and_does_not_spill_in_loops proves it)."""
    for jit, constexprs, warps, stages, *cap in _launches(kernel, entry, bucket):
        registers = cap[0] if cap else 0
        for cc in targets:
            assert any(b.kernel is jit and cc in b.targets and b.num_warps == warps
                       and (stages is None or b.num_stages == stages) and b.max_registers == registers
                       and all(b.constexprs.get(k) == v for k, v in constexprs.items()) for b in BUILDS), \
                f"{stem}.json {kernel} {bucket}: no build of {jit.__name__} {constexprs} for sm_{cc}"


def test_router_builds_wait_for_the_dot_as_their_family_launches():
    """Each raw-dot router build is compiled with the WAIT_DOT its target's launches pass
    (router.wait_for_dot), so the slot-race check above proves what runs."""
    family = {cc: name for name, cc in tuning.FAMILY_CC.items()}
    builds = [b for b in BUILDS if b.kernel is ROUTER.fused_router_kernel and b.constexprs["RAW_DOT"]]
    assert builds
    for build in builds:
        for cc in build.targets:
            assert build.constexprs["WAIT_DOT"] == ROUTER.wait_for_dot(family[cc]), (build.name, cc)


def test_maxsim_chunk_loop_masks_no_element_of_s():
    """The chunk loop takes S's row maxima without a mask (a document's last chunk repeats its last
    token): on the 256 x 64 / 8-warp scoring build for sm_90, fewer selects in one trip than S
    has elements a thread (a select per element was how padding was masked before)."""
    name = "maxsim_bf16_d128_scores_q8_BQ256_BD64_w8_s3"
    code = ("import importlib, json; from fused_ops import offline; "
            "ms = importlib.import_module('fused_ops.maxsim'); "
            f"build = next(b for b in ms.offline_builds() if b.name == {name!r}); "
            "print(json.dumps(offline.loop_opcodes(build, 90)))")
    ops = compiled_json(code)
    assert ops.get("HGMMA", 0) > 0, ops
    assert ops.get("FSEL", 0) < 256 * 64 // (8 * 32), ops


def test_the_slot_race_check_finds_the_router_without_its_wait():
    """offline.shared_slot_races flags the sm_90 raw-dot router built without WAIT_DOT (the build
    whose weights were off on the H200, router.wait_for_dot), so a clean report means something."""
    name = "router_bf16_M8192_E8_sm90"
    code = ("import dataclasses, importlib, json; from fused_ops import offline; "
            "router = importlib.import_module('fused_ops.router'); "
            f"build = next(b for b in router.offline_builds() if b.name == {name!r}); "
            "build = dataclasses.replace(build, constexprs={**build.constexprs, 'WAIT_DOT': False}); "
            "print(json.dumps(offline.compile_build(build, 90).slot_races))")
    races = compiled_json(code)
    assert races, "the unfixed build's x buffer should be flagged"
