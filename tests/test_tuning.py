"""Config lookup order, the environment switches, the fallbacks against the heuristics they replaced,
the launchers honouring a JSON entry, forced configs from the tuning spaces against the reference,
and the tuner's handling of failing candidates (the tuner's timing needs a GPU, so there it is
replaced by a deterministic stand-in)."""
import importlib
import json
import os
from dataclasses import asdict

import pytest
import torch

from fused_ops import moe, reference, tuner, tunables, tuning  # noqa: F401  (tunables registers kernels)

from conftest import DEVICE, assert_close, rand

LN = importlib.import_module("fused_ops.layernorm_linear")
MS = importlib.import_module("fused_ops.maxsim")
FAMILIES = ("sm_90", "sm_100", "sm_120", "generic")


@pytest.fixture(autouse=True)
def _fresh_caches():
    tuning.clear_caches()
    yield
    tuning.clear_caches()


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty user config folder searched first, and no shipped JSON."""
    monkeypatch.setenv("FUSED_OPS_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_OPS_FALLBACK_CONFIGS", raising=False)
    monkeypatch.setattr(tuning, "CONFIG_DIR", str(tmp_path / "none"))
    return tmp_path


def _write(folder, stem, family, kernel, bucket, entry):
    path = folder / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() else {"family": family, "source": "test", "triton": "x",
                                                               "kernels": {}}
    data["kernels"].setdefault(kernel, {})[bucket] = entry
    path.write_text(json.dumps(data))
    tuning.clear_caches()


def _moe_entry(block_m):
    return asdict(moe.MoeConfig(block_m, moe.GemmConfig(64, 64, 1, 4, 3), moe.GemmConfig(64, 64, 1, 4, 3)))


# kernel -> (a bucket, two distinct entries for it, the bucket's fallback on sm_90, parse)
KERNELS = {
    "moe_experts": ("pairs16", _moe_entry(64), _moe_entry(128), moe.fallback_config("pairs16", "sm_90"),
                    moe.config_from_json),
    "layernorm_linear": ("M256", asdict(LN.GemmConfig(64, 128, 32, 8, 4, 5)),
                         asdict(LN.GemmConfig(128, 64, 64, 4, 8, 3)), LN.gemm_fallback("M256", "sm_90"),
                         LN.gemm_from_json),
    "maxsim": ("d128_rows512", asdict(MS.Tiling(128, 32, 8, 4)), asdict(MS.Tiling(64, 128, 4, 2)),
               MS.heuristic_tiling(16, 32, 128, torch.bfloat16, tuning.SHARED_LIMIT["sm_90"]), MS.tiling_from_json),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_device_file_then_family_file_then_fallback(config_dir, monkeypatch, kernel):
    bucket, family_entry, device_entry, fallback, parse = KERNELS[kernel]
    assert tuning._tuned(kernel, bucket, "GPU X", "sm_90", parse) is None
    _write(config_dir, "sm_90", "sm_90", kernel, bucket, family_entry)
    assert tuning._tuned(kernel, bucket, "GPU X", "sm_90", parse) == parse(family_entry) != fallback
    _write(config_dir, tuning.device_key("GPU X"), "sm_90", kernel, bucket, device_entry)
    entry, source = tuning.lookup(kernel, bucket, "GPU X", "sm_90")
    assert entry == device_entry and source.startswith("GPU_X.json")
    assert tuning._tuned(kernel, bucket, "GPU X", "sm_120", parse) == parse(device_entry)   # by name first
    assert tuning._tuned(kernel, "other", "GPU X", "sm_90", parse) is None                  # per bucket
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    assert tuning.lookup(kernel, bucket, "GPU X", "sm_90") == (None, "fallback (FUSED_OPS_FALLBACK_CONFIGS=1)")
    tuning.clear_caches()
    assert tuning._tuned(kernel, bucket, "GPU X", "sm_90", parse) is None


def test_config_for_caches_the_fallback_per_bucket(config_dir):
    assert tuning._resolve("moe_experts", "pairs16", "GPU X", "sm_90", moe.fallback_config,
                           moe.config_from_json) == moe.fallback_config("pairs16", "sm_90")
    _write(config_dir, "sm_90", "sm_90", "moe_experts", "pairs16", _moe_entry(64))
    assert tuning._resolve("moe_experts", "pairs16", "GPU X", "sm_90", moe.fallback_config,
                           moe.config_from_json).block_m == 64


@pytest.mark.parametrize("family, dim, tensor", [("sm_90", 128, True), ("sm_90", 96, True), ("sm_90", 256, False),
                                                 ("sm_100", 128, False), ("sm_120", 64, False)])
def test_float32_maxsim_takes_the_tensor_cores_where_they_build(monkeypatch, family, dim, tensor):
    """MaxSim's float32 tensor-core tilings on the families and d whose tf32x3 builds do not spill
    (64 x 64 for one 32-token query, 128 x 64 for 16 and for a 1024-token one); the float32
    family's FMA tile elsewhere."""
    monkeypatch.setattr(tuning, "device_family", lambda device: family)
    for n_queries, q_tokens, tensor_tiling in ((1, 32, MS.Tiling(64, 64, 4, 3)), (16, 32, MS.Tiling(128, 64, 8, 2)),
                                               (1, 1024, MS.Tiling(128, 64, 8, 2))):
        cfg = MS.pick_config(n_queries, q_tokens, 1000, dim, torch.float32, torch.device("cpu"))
        got = MS.Tiling(cfg.block_q, cfg.block_d, cfg.num_warps, cfg.num_stages)
        if tensor:
            assert got == tensor_tiling
        else:
            assert got.tile == MS._family(torch.float32, dim)[1][0]
    assert MS.fp32_tensor_cores(torch.float32, dim, family) == tensor
    assert not MS.fp32_tensor_cores(torch.bfloat16, dim, family)


def test_names_and_buckets():
    assert tuning.device_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuning.family_of(9) == "sm_90" and tuning.family_of(12) == "sm_120" and tuning.family_of(8) == "generic"
    assert moe.pairs_bucket(32 * 4, 8) == 16 and moe.pairs_bucket(200 * 4, 8) == 128 and moe.pairs_bucket(1, 8) == 1
    assert [LN.gemm_bucket(M) for M in (17, 64, 65, 3000, 8192)] == ["M32", "M64", "M128", "M4096", "M8192"]
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert MS.tuning_bucket(1, 32, 128, bf16) == MS.tuning_bucket(1, 20, 96, fp16) == "d128_rows32"
    assert MS.tuning_bucket(16, 32, 200, bf16) == "d256_rows512" and MS.tuning_bucket(3, 5, 7, bf16) == "d255_rows16"
    assert MS.tuning_bucket(1, 1024, 64, fp32) == "fp32_rows1024"
    for bucket in ("d128_rows32", "d256_rows8", "d255_rows1", "fp32_rows64"):
        dtype, dim = MS.bucket_family(bucket)
        assert MS.tuning_bucket(1, 1, dim, dtype).split("_")[0] == bucket.split("_")[0]


# the gemm's fallback table: (M, family) -> (BM, BN, BK, GROUP_M, warps, stages), cut to the family's
# shared memory (sm_120: 2 stages)
FALLBACK_GEMM = {(8, "sm_90"): (64, 128, 64, 8, 4, 4), (40, "sm_90"): (64, 64, 128, 8, 4, 4),
                 (16, "sm_120"): (64, 128, 64, 8, 4, 2), (128, "sm_100"): (64, 64, 128, 8, 4, 4),
                 (300, "sm_90"): (128, 128, 64, 8, 8, 4), (8192, "sm_90"): (256, 128, 64, 8, 8, 4),
                 (8192, "sm_100"): (128, 128, 64, 8, 8, 4), (40, "sm_120"): (64, 64, 128, 8, 4, 2),
                 (3000, "sm_120"): (128, 128, 64, 8, 8, 2)}


@pytest.mark.parametrize("M, family", FALLBACK_GEMM)
def test_gemm_fallback_table(M, family):
    t = tunables.tuning.TUNABLES["layernorm_linear"]
    expected = LN.GemmConfig(*FALLBACK_GEMM[(M, family)])
    assert LN.gemm_fallback(LN.gemm_bucket(M), family) == expected
    assert t.fallback(dict(M=M, **tunables.REFERENCE_LN), family) == expected


def test_gemm_launch_config_without_json(config_dir):
    """No JSON: the fallback of this device's family, and float32's table by M."""
    _, family = tuning.current_device()
    device = torch.device(DEVICE)
    assert LN.pick_gemm_config(300, torch.bfloat16, device) == LN.fit_shared(
        LN.gemm_fallback("M512", family), LN.max_shared_memory(device))
    mma_sync = ((17, (64, 128, 16, 8, 4, 4)), (9000, (64, 128, 16, 8, 4, 4)))
    tiles = {"sm_120": mma_sync, "generic": mma_sync,
             "sm_100": ((17, (64, 128, 16, 8, 4, 4)), (64, (64, 128, 16, 8, 4, 4)), (65, (128, 128, 32, 8, 8, 4)))}
    for M, tile in tiles.get(family, ((17, (64, 128, 32, 8, 4, 3)), (64, (64, 128, 32, 8, 4, 3)),
                                      (65, (128, 128, 32, 8, 8, 4)), (9000, (128, 128, 32, 8, 8, 4)))):
        assert LN.gemm_fp32_config(M, family) == LN.GemmConfig(*tile)
        assert LN.pick_gemm_config(M, torch.float32, device) == LN.fit_shared(
            LN.GemmConfig(*tile), LN.max_shared_memory(device), 4)


# (Nq, Lq, d, dtype, family) -> the old choose_config at Nd = 10000 on 132 SMs:
# (block_q, block_d, group, warps, stages)
OLD_MAXSIM = {(1, 32, 128, torch.bfloat16, "sm_90"): (32, 64, 9, 2, 3),
              (16, 32, 128, torch.bfloat16, "sm_90"): (256, 64, 16, 8, 3),
              (16, 32, 128, torch.bfloat16, "sm_120"): (256, 64, 16, 8, 2),
              (3, 100, 96, torch.float16, "sm_100"): (128, 64, 16, 8, 3),
              (1, 1024, 200, torch.bfloat16, "sm_120"): (128, 32, 16, 8, 2),
              (2, 3, 7, torch.bfloat16, "sm_90"): (32, 16, 9, 4, 3),
              (4, 8, 64, torch.float32, "sm_90"): (32, 32, 9, 4, 3)}


@pytest.mark.parametrize("key", OLD_MAXSIM, ids=[str(i) for i in range(len(OLD_MAXSIM))])
def test_maxsim_fallback_is_the_old_heuristic(key):
    Nq, Lq, d, dtype, family = key
    smem = tuning.SHARED_LIMIT[family]
    block_q, block_d, group, warps, stages = OLD_MAXSIM[key]
    tiling = MS.heuristic_tiling(Nq, Lq, d, dtype, smem)
    assert tiling == MS.Tiling(block_q, block_d, warps, stages)
    cfg = MS.choose_config(Nq, Lq, 10_000, d, dtype, 132, smem)
    assert cfg == MS.choose_config(Nq, Lq, 10_000, d, dtype, 132, smem, tiling=tiling)
    assert cfg == MS.MaxSimConfig(block_q, block_d, group, warps, stages)
    if dtype == torch.bfloat16 and d == 128:
        shape = dict(tunables.MAXSIM_SHAPES[0], Nq=Nq, Lq=Lq)
        assert tuning.TUNABLES["maxsim"].fallback(shape, family) == tiling


def test_every_candidate_fits_its_family_and_round_trips():
    for name, t in tuning.TUNABLES.items():
        for family in FAMILIES:
            for shape in t.shapes:
                fitting = [c for c in t.space(family, shape) if t.fits(c, family, shape)]
                assert fitting or family == "generic", f"{name} has no candidate for {family} at {shape}"
                for config in fitting + [t.fallback(shape, family)]:
                    assert t.parse(json.loads(json.dumps(t.to_json(config)))) == config


class _LaunchLog:
    """Wraps a module's kernel to record the keyword arguments (constexprs) of each launch."""

    def __init__(self, monkeypatch, module, name):
        self.calls = []
        kernel, calls = getattr(module, name), self.calls

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(kwargs)
                    return kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(module, name, Spy())


def _ln_inputs(M, K, N, dtype):
    return (rand(M, K, dtype=dtype), rand(K, dtype=dtype), rand(K, dtype=dtype),
            rand(N, K, dtype=dtype, scale=K ** -0.5), rand(N, dtype=dtype))


def _ln_oracle(x, g, b, w, bias):
    return reference.layernorm_linear(x.double(), g.double(), b.double(), w.double(), bias.double())


def test_layernorm_linear_launch_honours_a_json_entry(config_dir, monkeypatch):
    import fused_ops
    name, family = tuning.current_device()
    forced = LN.GemmConfig(32, 64, 32, 2, 4, 2)
    _write(config_dir, family, family, "layernorm_linear", "M64", asdict(forced))
    log = _LaunchLog(monkeypatch, LN, "layernorm_linear_folded_gemm_kernel")
    x, g, b, w, bias = _ln_inputs(40, 200, 520, torch.bfloat16)
    y = fused_ops.layernorm_linear(x, g, b, w, bias)
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], c["num_warps"], c["STAGES"]) for c in log.calls] \
        == [(32, 64, 32, 2, 4, 2)]
    assert_close(y, _ln_oracle(x, g, b, w, bias), torch.bfloat16)
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    tuning.clear_caches()
    fused_ops.layernorm_linear(x, g, b, w, bias)
    assert log.calls[-1]["BLOCK_M"] == LN.pick_gemm_config(40, torch.bfloat16, x.device).block_m != 32


def test_maxsim_launch_honours_a_json_entry(config_dir, monkeypatch):
    import fused_ops
    name, family = tuning.current_device()
    _write(config_dir, family, family, "maxsim", "d128_rows8", asdict(MS.Tiling(16, 16, 4, 2)))
    log = _LaunchLog(monkeypatch, MS, "maxsim_kernel")
    Q, D = rand(2, 3, 16, dtype=torch.bfloat16), rand(5, 40, 16, dtype=torch.bfloat16)
    d_lengths = torch.tensor([40, 0, 17, 1, 33], device=DEVICE)
    out = fused_ops.maxsim(Q, D, d_lengths=d_lengths)
    values, indices = fused_ops.maxsim_topk(Q, D, 2, d_lengths=d_lengths)
    assert {(c["BLOCK_Q"], c["BLOCK_D"], c["num_warps"], c["num_stages"]) for c in log.calls} == {(16, 16, 4, 2)}
    ref = reference.maxsim(Q.double(), D.double(), d_lengths=d_lengths)
    assert_close(out, ref, torch.bfloat16)
    assert_close(values, ref.topk(2, dim=-1).values, torch.bfloat16)
    fused_ops.maxsim(rand(2, 3, 8, dtype=torch.bfloat16), D[..., :8], d_lengths=d_lengths)     # same bucket
    fused_ops.maxsim(rand(2, 5, 16, dtype=torch.bfloat16), D, d_lengths=d_lengths)             # rows16: fallback
    assert log.calls[-2]["BLOCK_Q"] == 16 and log.calls[-1]["BLOCK_Q"] != 16


def test_maxsim_topk_takes_its_own_entry_and_scoring_keeps_its_own(config_dir, monkeypatch):
    import fused_ops
    name, family = tuning.current_device()
    _write(config_dir, family, family, "maxsim", "d128_rows8", asdict(MS.Tiling(16, 16, 4, 2)))
    entry, source = tuning.lookup("maxsim_topk", "d128_rows8", name, family)     # none of its own: maxsim's
    assert entry == asdict(MS.Tiling(16, 16, 4, 2)) and "maxsim's entry" in source
    _write(config_dir, family, family, "maxsim_topk", "d128_rows8", asdict(MS.Tiling(32, 32, 2, 3)))
    log = _LaunchLog(monkeypatch, MS, "maxsim_kernel")
    Q, D = rand(2, 3, 16, dtype=torch.bfloat16), rand(40, 40, 16, dtype=torch.bfloat16)
    d_lengths = torch.randint(0, 41, (40,), device=DEVICE)
    ref = reference.maxsim(Q.double(), D.double(), d_lengths=d_lengths)
    assert_close(fused_ops.maxsim(Q, D, d_lengths=d_lengths), ref, torch.bfloat16)
    values, _ = fused_ops.maxsim_topk(Q, D, 3, d_lengths=d_lengths)
    assert_close(values, ref.topk(3, dim=-1).values, torch.bfloat16)
    assert [(c["TOPK"], c["BLOCK_Q"], c["BLOCK_D"], c["num_warps"], c["num_stages"]) for c in log.calls] \
        == [(False, 16, 16, 4, 2), (True, 32, 32, 2, 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forced_gemm_configs_from_the_space_match_the_reference(monkeypatch, dtype):
    """Non-default candidates: 5 stages over a masked K tail, and a 256-wide column block past N."""
    shape = dict(M=40, **tunables.REFERENCE_LN)
    space = tuning.TUNABLES["layernorm_linear"].space("sm_90", shape)
    x, g, b, w, bias = _ln_inputs(40, 200, 520, dtype)
    ref = _ln_oracle(x, g, b, w, bias)
    log = _LaunchLog(monkeypatch, LN, "layernorm_linear_folded_gemm_kernel")
    for config in (LN.GemmConfig(64, 128, 64, 8, 4, 5), LN.GemmConfig(64, 256, 64, 8, 8, 3)):
        assert config in space and config != LN.gemm_fallback("M64", "sm_90")
        y = torch.full((40, 520), float("nan"), dtype=dtype, device=DEVICE)
        LN._launch_gemm(x, g, b, w, bias, y, 1e-5, config)
        expected = dict(LN.gemm_constexprs(config), num_warps=config.num_warps)
        assert {key: log.calls[-1][key] for key in expected} == expected
        assert_close(y, ref, dtype)


def test_forced_maxsim_tilings_from_the_space_match_the_reference(monkeypatch):
    """Non-default candidates on both paths: half and twice the chunk, more warps, other stages."""
    Nq, Lq, d = 3, 20, 16
    space = tuning.TUNABLES["maxsim"].space("sm_90", dict(tunables.MAXSIM_SHAPES[0], Nq=Nq, Lq=Lq, d=d))
    Q, D = rand(Nq, Lq, d, dtype=torch.bfloat16), rand(9, 70, d, dtype=torch.bfloat16)
    d_lengths = torch.tensor([70, 0, 65, 1, 64, 33, 2, 69, 40], device=DEVICE)
    ref = reference.maxsim(Q.double(), D.double(), d_lengths=d_lengths)
    log = _LaunchLog(monkeypatch, MS, "maxsim_kernel")
    for tiling in (MS.Tiling(32, 32, 2, 2), MS.Tiling(64, 128, 8, 4)):
        assert tiling in space and tiling != MS.heuristic_tiling(Nq, Lq, d, torch.bfloat16, 232448)
        for k in (None, 3):
            cfg = MS.choose_config(Nq, Lq, D.shape[0], d, torch.bfloat16, 4, 1 << 30, k, tiling)
            if k is None:
                assert_close(MS.launch_maxsim(Q, D, None, d_lengths, "sum", cfg), ref, torch.bfloat16)
            else:
                values, _ = MS.launch_maxsim_topk(Q, D, k, None, d_lengths, "sum", cfg)
                assert_close(values, ref.topk(k, dim=-1).values, torch.bfloat16)
            launched = log.calls[-1]
            assert launched["TOPK"] == (k is not None)
            assert (launched["BLOCK_Q"], launched["BLOCK_D"], launched["num_warps"], launched["num_stages"]) \
                == (tiling.block_q, tiling.block_d, tiling.num_warps, tiling.num_stages)


def test_configs_report_names_the_json_or_the_fallback(config_dir, capsys):
    from fused_ops.__main__ import main
    _write(config_dir, "sm_100", "sm_100", "maxsim", "d128_rows512", asdict(MS.Tiling(128, 32, 8, 4)))
    main(["configs", "--device", "NVIDIA B200"])
    out = capsys.readouterr().out
    assert "family sm_100" in out
    lines = out.splitlines()
    for kernel in ("moe_experts", "layernorm_linear", "maxsim"):
        assert any(line.startswith(kernel) for line in lines)
    maxsim_512 = next(i for i, line in enumerate(lines) if line.startswith("maxsim") and "d128_rows512" in line)
    assert "<- sm_100.json (test" in lines[maxsim_512] and "'block_q': 128" in lines[maxsim_512 + 1]
    assert "(fallback: {'block_q': 256" in lines[maxsim_512 + 2]
    assert any(line.startswith("layernorm_linear") and "built-in fallback (no JSON entry)" in line for line in lines)


def test_tuner_skips_failures_and_rejects_wrong_winners(tmp_path, monkeypatch):
    """Candidates that raise are recorded and skipped; the fastest wrong one and the faster one
    that spills registers are not chosen."""
    configs = ["fallback", "crashes", "fast_but_wrong", "spills", "good"]
    times = {"fallback": 3.0, "fast_but_wrong": 1.0, "spills": 1.5, "good": 2.0}

    def make_run(shape, config):
        if config == "crashes":
            raise RuntimeError("OutOfResources: shared memory")
        return (lambda: config), (lambda: 1.0 if config == "fast_but_wrong" else 0.0)

    fake = tuning.Tunable(name="fake", space=lambda family, shape: configs[1:], fits=lambda c, f, s: True,
                          bucket=lambda s: "b", fallback=lambda s, f: "fallback", make_run=make_run,
                          to_json=lambda c: {"name": c}, parse=lambda e: e["name"], shapes=[{"M": 1}])
    monkeypatch.setattr(tuner, "_time_ms", lambda run: times[run()])
    monkeypatch.setattr(tuner, "_local_bytes", lambda run: 64 if run() == "spills" else 0)
    monkeypatch.setitem(tuning.TUNABLES, "fake", fake)
    monkeypatch.setattr(tuning, "current_device", lambda: ("Fake GPU", "sm_90"))
    path = tuner.tune(["fake"], out_dir=str(tmp_path), progress=False)
    data = json.loads(open(path).read())
    assert data["kernels"]["fake"] == {"b": {"name": "good"}}
    assert data["speedup_vs_fallback"]["fake"] == {"b": 1.5}
    log = [json.loads(line) for line in open(path[: -len(".json")] + ".tune-log.jsonl")]
    assert any("OutOfResources" in r.get("error", "") for r in log)
    assert any("wrong result" in r.get("error", "") for r in log)
    assert [r["ms"] for r in log if "spills registers: 64 bytes" in r.get("error", "")] == [1.5]


@pytest.mark.skipif(DEVICE != "cuda", reason="reads a compiled kernel's local memory from the CUDA driver")
def test_tuner_reads_register_spills_from_the_driver():
    """The maxsim top-k kernel at 256 x 64 / 4 warps spills (the offline compile shows 40-72 bytes a
    thread on sm_90); at 128 x 64 / 4 warps it does not."""
    Q, D = rand(16, 32, 128, dtype=torch.bfloat16), rand(1100, 64, 128, dtype=torch.bfloat16)
    sizes = {}
    for block_q in (256, 128):          # the tuning shape's k and groups (k = 100 needs 200 documents a group)
        tile = MS.Tile(block_q, 64, 4)
        cfg = MS.MaxSimConfig(block_q, 64, MS.topk_group_bound(tile, MS._Rows.of(block_q, 16, 32).qpb_pad), 4, 3)
        sizes[block_q] = tuner._local_bytes(lambda: MS.launch_maxsim_topk(Q, D, 100, None, None, "sum", cfg))
    assert sizes[256] > 0 and sizes[128] == 0, sizes


# ---------------------------------------------------------------------------------------------
# softmax_laplace and topk_gating (whole rows per program; softmax's online kernel past 32K)
# ---------------------------------------------------------------------------------------------
SOFTMAX = importlib.import_module("fused_ops.softmax")
TOPK = importlib.import_module("fused_ops.topk")

# what _runtime.row_tiles gave the launchers before their configs went through tuning.py:
# (rows, columns) -> (BLOCK_M, BLOCK_N, num_warps)
OLD_ROW_TILES = {(1, 8): (1, 8, 1), (32, 8): (32, 8, 1), (32768, 8): (64, 8, 1), (3, 50): (4, 64, 1),
                 (8192, 64): (32, 64, 4), (100, 1000): (2, 1024, 4), (4096, 4096): (1, 4096, 8),
                 (7, 5000): (1, 8192, 16), (8192, 32000): (1, 32768, 32), (2, 32768): (1, 32768, 32), (1, 1): (1, 1, 1),
                 (65536, 128): (16, 128, 4), (5, 8192): (1, 8192, 16)}


@pytest.mark.parametrize("shape", OLD_ROW_TILES)
def test_row_kernel_fallbacks_are_the_old_heuristic(shape):
    block_m, block_n, warps = OLD_ROW_TILES[shape]
    M, N = shape
    for family in FAMILIES:
        expected = SOFTMAX.SoftmaxConfig(block_m, block_n, warps)
        assert SOFTMAX.fallback_config(SOFTMAX.softmax_bucket(M, N), family) == expected
        assert tuning.TUNABLES["softmax_laplace"].fallback(dict(M=M, N=N), family) == expected
        expected = TOPK.TopkConfig(block_m, warps)
        assert TOPK.fallback_config(TOPK.topk_bucket(M, N), family) == expected
        assert tuning.TUNABLES["topk_gating"].fallback(dict(M=M, E=N, k=1), family) == expected


def test_softmax_online_fallback_is_the_old_chunking():
    for M, N in ((1, 32769), (3, 40000), (1024, 65536), (7, 1 << 20)):
        assert SOFTMAX.fallback_config(SOFTMAX.softmax_bucket(M, N), "sm_90") == SOFTMAX.SoftmaxConfig(1, 4096, 8)


def test_row_kernel_buckets():
    assert [SOFTMAX.softmax_bucket(M, N) for M, N in ((1, 1), (40, 100), (8192, 32000), (1025, 65536))] \
        == ["M1_N1", "M64_N128", "M8192_N32768", "M2048_N65536"]
    assert [TOPK.topk_bucket(M, E) for M, E in ((3, 8), (40, 10), (65536, 128))] == ["M4_E8", "M64_E16", "M65536_E128"]
    assert SOFTMAX.is_online("M1_N65536") and not SOFTMAX.is_online("M1_N32768")
    assert SOFTMAX.bucket_shape("M64_N128") == TOPK.bucket_shape("M64_E128") == (64, 128)


# kernel -> (a bucket, an entry for it that is not its fallback, fallback, parse, to_json)
ROW_KERNELS = {
    "softmax_laplace": ("M64_N128", SOFTMAX.SoftmaxConfig(4, 128, 2), SOFTMAX.fallback_config,
                        SOFTMAX.config_from_json, asdict),
    "topk_gating": ("M64_E16", TOPK.TopkConfig(4, 1), TOPK.fallback_config, TOPK.config_from_json,
                    asdict),
}


@pytest.mark.parametrize("kernel", ROW_KERNELS)
def test_row_kernels_resolve_device_then_family_then_fallback(config_dir, monkeypatch, kernel):
    bucket, entry, fallback, parse, to_json = ROW_KERNELS[kernel]
    resolve = lambda b: tuning._resolve(kernel, b, "GPU X", "sm_90", fallback, parse)  # noqa: E731
    assert resolve(bucket) == fallback(bucket, "sm_90") != entry
    _write(config_dir, "sm_90", "sm_90", kernel, bucket, to_json(entry))
    assert resolve(bucket) == entry
    other = bucket.replace("M64", "M128")
    assert resolve(other) == fallback(other, "sm_90")                   # per bucket
    device_entry = type(entry)(**{**to_json(entry), "num_warps": 4})
    _write(config_dir, tuning.device_key("GPU X"), "sm_90", kernel, bucket, to_json(device_entry))
    assert resolve(bucket) == device_entry                               # the device's file first
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    tuning.clear_caches()
    assert resolve(bucket) == fallback(bucket, "sm_90")


def _launched(call: dict, *names) -> tuple:
    return tuple(call[n] for n in names)


def test_softmax_launch_honours_a_json_entry(config_dir, monkeypatch):
    import fused_ops
    _, family = tuning.current_device()
    entries = {"M64_N128": SOFTMAX.SoftmaxConfig(4, 128, 2), "M2_N65536": SOFTMAX.SoftmaxConfig(1, 2048, 4)}
    for bucket, config in entries.items():
        _write(config_dir, family, family, "softmax_laplace", bucket, asdict(config))
    rows_log = _LaunchLog(monkeypatch, SOFTMAX, "softmax_laplace_rows_kernel")
    online_log = _LaunchLog(monkeypatch, SOFTMAX, "softmax_laplace_online_kernel")
    for shape in ((40, 100), (5, 7, 100)):                                # 35 rows: the same bucket
        x = rand(*shape, dtype=torch.bfloat16)
        out = fused_ops.softmax_laplace(x, temperature=0.7, alpha=0.01)
        assert _launched(rows_log.calls[-1], "BLOCK_M", "BLOCK_N", "num_warps") == (4, 128, 2)
        assert_close(out, reference.softmax_laplace(x.double(), temperature=0.7, alpha=0.01), torch.bfloat16)
    x = rand(2, 40000)
    out = fused_ops.softmax_laplace(x, temperature=0.7, alpha=0.01)
    assert _launched(online_log.calls[-1], "BLOCK_N", "num_warps") == (2048, 4)
    assert_close(out, reference.softmax_laplace(x.double(), temperature=0.7, alpha=0.01), torch.float32)
    fused_ops.softmax_laplace(rand(70, 100))                              # M128_N128: no entry
    assert _launched(rows_log.calls[-1], "BLOCK_M", "BLOCK_N", "num_warps") == (16, 128, 4)
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    tuning.clear_caches()
    fused_ops.softmax_laplace(rand(40, 100))
    assert _launched(rows_log.calls[-1], "BLOCK_M", "BLOCK_N", "num_warps") == (16, 128, 4)


def test_topk_launch_honours_a_json_entry(config_dir, monkeypatch):
    import fused_ops
    _, family = tuning.current_device()
    _write(config_dir, family, family, "topk_gating", "M64_E16", asdict(TOPK.TopkConfig(4, 1)))
    log = _LaunchLog(monkeypatch, TOPK, "topk_gating_kernel")
    p = reference.softmax_laplace(rand(40, 10))
    w, i = fused_ops.topk_gating(p, 3, renormalize=True)
    assert _launched(log.calls[-1], "BLOCK_M", "BLOCK_E", "BLOCK_K", "num_warps") == (4, 16, 4, 1)
    w_ref, i_ref = reference.topk_gating(p.double(), 3, renormalize=True)
    assert_close(w, w_ref, torch.float32)
    assert torch.equal(i.cpu(), i_ref.cpu())
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    tuning.clear_caches()
    fused_ops.topk_gating(p, 3)
    assert _launched(log.calls[-1], "BLOCK_M", "num_warps") == (64, 2)


def test_forced_row_kernel_configs_from_the_space_match_the_reference(monkeypatch):
    """Every candidate of a small bucket, and two online chunkings, against the reference."""
    rows_log = _LaunchLog(monkeypatch, SOFTMAX, "softmax_laplace_rows_kernel")
    online_log = _LaunchLog(monkeypatch, SOFTMAX, "softmax_laplace_online_kernel")
    topk_log = _LaunchLog(monkeypatch, TOPK, "topk_gating_kernel")
    for shape, dtype, log in (((40, 100), torch.bfloat16, rows_log), ((3, 33000), torch.float16, online_log)):
        M, N = shape
        t = tuning.TUNABLES["softmax_laplace"]
        space = [c for c in t.space("sm_90", dict(M=M, N=N)) if t.fits(c, "sm_90", dict(M=M, N=N))]
        fallback = t.fallback(dict(M=M, N=N), "sm_90")
        forced = [c for c in space if c != fallback]
        forced = forced if M * N < 10000 else [forced[0], forced[-1]]    # the interpreter is slow on wide rows
        x = rand(M, N, dtype=dtype)
        ref = reference.softmax_laplace(x.double(), temperature=0.7, alpha=0.01)
        for config in forced:
            assert_close(SOFTMAX.launch_softmax_laplace(x, 0.7, 0.01, config=config), ref, dtype)
            assert _launched(log.calls[-1], "BLOCK_N", "num_warps") == (config.block_n, config.num_warps)
    t = tuning.TUNABLES["topk_gating"]
    shape = dict(M=40, E=10, k=3)
    p = reference.softmax_laplace(rand(40, 10))
    w_ref, i_ref = reference.topk_gating(p.double(), 3)
    for config in t.space("sm_90", shape):
        if t.fits(config, "sm_90", shape) and config != t.fallback(shape, "sm_90"):
            w, i = TOPK.launch_topk_gating(p, 3, False, config=config)
            assert _launched(topk_log.calls[-1], "BLOCK_M", "num_warps") == (config.block_m, config.num_warps)
            assert_close(w, w_ref, torch.float32)
            assert torch.equal(i.cpu(), i_ref.cpu())
    with pytest.raises(ValueError, match="narrower"):
        SOFTMAX.launch_softmax_laplace(rand(2, 100), 1.0, 0.0, config=SOFTMAX.SoftmaxConfig(1, 64, 1))


def test_shipped_row_kernel_entries_become_offline_builds(config_dir, monkeypatch):
    """A shipped entry is built for its file's family only; the fallbacks for every target."""
    monkeypatch.setattr(tuning, "CONFIG_DIR", str(config_dir))
    _write(config_dir, "sm_120", "sm_120", "softmax_laplace", "M64_N128",
           asdict(SOFTMAX.SoftmaxConfig(4, 128, 2)))
    _write(config_dir, "sm_120", "sm_120", "topk_gating", "M64_E16", asdict(TOPK.TopkConfig(4, 1)))
    assert SOFTMAX.shipped_configs()[(False, SOFTMAX.SoftmaxConfig(4, 128, 2))] == (120,)
    assert SOFTMAX.shipped_configs()[(True, SOFTMAX.SoftmaxConfig(1, 4096, 8))] == (90, 100, 120, 80)
    assert TOPK.shipped_configs()[(TOPK.TopkConfig(4, 1), 16)] == (120,)
    names = {b.name: b.targets for b in SOFTMAX.offline_builds() + TOPK.offline_builds()}
    assert names["softmax_rows_bf16_M4_N128_w2"] == names["topk_E16_M4_w1_k8"] == (120,)


def test_configs_report_lists_the_row_kernels(monkeypatch, capsys):
    """H200 has tuned row-kernel entries (shown with the fallback they replace); B200's family file
    has none, so the built-in fallback is reported."""
    from fused_ops.__main__ import main
    monkeypatch.delenv("FUSED_OPS_CONFIG_DIR", raising=False)
    monkeypatch.delenv("FUSED_OPS_FALLBACK_CONFIGS", raising=False)
    shipped = tuning._load(os.path.join(tuning.CONFIG_DIR, "NVIDIA_H200.json"))["kernels"]
    for device, source in (("NVIDIA H200", "NVIDIA_H200.json"), ("NVIDIA B200", "built-in fallback (no JSON entry)")):
        main(["configs", "--device", device])
        lines = capsys.readouterr().out.splitlines()
        for kernel, bucket in (("softmax_laplace", "M1024_N65536"), ("topk_gating", "M65536_E128")):
            at = next(i for i, line in enumerate(lines) if line.startswith(kernel) and bucket in line)
            assert source in lines[at]
            if device == "NVIDIA H200":
                assert str(shipped[kernel][bucket]) == lines[at + 1].strip()


def test_tune_applies_shapes_only_to_kernels_with_their_keys(monkeypatch, capsys):
    """--shapes M=... tunes the kernels whose shapes have M over their default shape, skips the
    others (maxsim: Nq, Lq, ...) with a note, and refuses them where they were named."""
    from fused_ops.__main__ import main
    tuned = []
    monkeypatch.setattr(tuner, "tune", lambda names, shapes, out: tuned.append((names[0], shapes)))
    main(["tune", "--shapes", "M=64", "M=8,K=7"])
    by_name = dict(tuned)
    assert by_name["layernorm_linear"] == [{"M": 64, "K": 8320, "N": 4096}, {"M": 8, "K": 7, "N": 4096}]
    assert "maxsim" not in by_name and "maxsim: skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not maxsim's"):
        main(["tune", "--op", "maxsim", "--shapes", "M=64"])
    with pytest.raises(SystemExit, match="KEY=INTEGER"):
        main(["tune", "--op", "layernorm_linear", "--shapes", "M64"])
