"""Config lookup order, the environment switches, and the tuner's handling of failing candidates
(the tuner's timing needs a GPU, so here it is replaced by a deterministic stand-in)."""
import json

import pytest

from fused_ops import moe, tuner, tunables, tuning  # noqa: F401  (tunables registers kernels)


@pytest.fixture(autouse=True)
def _fresh_caches():
    tuning.clear_caches()
    yield
    tuning.clear_caches()


def _write(folder, stem, family, entry):
    (folder / f"{stem}.json").write_text(json.dumps(
        {"family": family, "source": "test", "triton": "x", "kernels": {"moe_experts": {"pairs16": entry}}}))


def _entry(block_m):
    return moe.config_to_json(moe.MoeConfig(block_m, moe.GemmConfig(64, 64, 1, 4, 3), moe.GemmConfig(64, 64, 1, 4, 3)))


def test_device_file_then_family_file_then_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_OPS_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "CONFIG_DIR", str(tmp_path / "none"))
    fallback = moe.fallback_config("pairs16", "sm_90")
    assert tuning._resolve("moe_experts", "pairs16", "GPU X", "sm_90", moe.fallback_config,
                           moe.config_from_json) == fallback
    _write(tmp_path, "sm_90", "sm_90", _entry(64))
    tuning.clear_caches()
    assert tuning._resolve("moe_experts", "pairs16", "GPU X", "sm_90", moe.fallback_config,
                           moe.config_from_json).block_m == 64
    _write(tmp_path, tuning.device_key("GPU X"), "sm_90", _entry(128))
    tuning.clear_caches()
    entry, source = tuning.lookup("moe_experts", "pairs16", "GPU X", "sm_90")
    assert entry["block_m"] == 128 and source.startswith("GPU_X.json")
    monkeypatch.setenv("FUSED_OPS_FALLBACK_CONFIGS", "1")
    assert tuning.lookup("moe_experts", "pairs16", "GPU X", "sm_90") == (None, "fallback (FUSED_OPS_FALLBACK_CONFIGS=1)")


def test_names_and_buckets():
    assert tuning.device_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuning.family_of(9) == "sm_90" and tuning.family_of(12) == "sm_120" and tuning.family_of(8) == "generic"
    assert moe.pairs_bucket(32 * 4, 8) == 16 and moe.pairs_bucket(200 * 4, 8) == 128 and moe.pairs_bucket(1, 8) == 1


def test_every_candidate_fits_its_family():
    for name, t in tuning.TUNABLES.items():
        for family in ("sm_90", "sm_100", "sm_120"):
            for shape in t.shapes:
                fitting = [c for c in t.space(family, shape) if t.fits(c, family)]
                assert fitting, f"{name} has no candidate for {family} at {shape}"


def test_tuner_skips_failures_and_rejects_wrong_winners(tmp_path, monkeypatch):
    """Candidates that raise are recorded and skipped; the fastest wrong one is not chosen."""
    configs = ["fallback", "crashes", "fast_but_wrong", "good"]
    times = {"fallback": 3.0, "fast_but_wrong": 1.0, "good": 2.0}

    def make_run(shape, config):
        if config == "crashes":
            raise RuntimeError("OutOfResources: shared memory")
        return (lambda: config), (lambda: 1.0 if config == "fast_but_wrong" else 0.0)

    fake = tuning.Tunable(name="fake", space=lambda family, shape: configs[1:], fits=lambda c, f: True,
                          bucket=lambda s: "b", fallback=lambda b, f: "fallback", make_run=make_run,
                          to_json=lambda c: {"name": c}, parse=lambda e: e["name"], shapes=[{"M": 1}])
    monkeypatch.setattr(tuner, "_time_ms", lambda run: times[run()])
    monkeypatch.setitem(tuning.TUNABLES, "fake", fake)
    monkeypatch.setattr(tuning, "current_device", lambda: ("Fake GPU", "sm_90"))
    path = tuner.tune(["fake"], out_dir=str(tmp_path), progress=False)
    data = json.loads(open(path).read())
    assert data["kernels"]["fake"] == {"b": {"name": "good"}}
    assert data["speedup_vs_fallback"]["fake"] == {"b": 1.5}
    log = [json.loads(line) for line in open(path[: -len(".json")] + ".tune-log.jsonl")]
    assert any("OutOfResources" in r.get("error", "") for r in log)
    assert any("wrong result" in r.get("error", "") for r in log)
