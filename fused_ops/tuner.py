"""The tuner behind `python -m fused_ops tune`: sweeps each tunable kernel's config space on the
GPU at hand, survives any compile or launch failure of a candidate (recorded and skipped), checks
the winner against the reference, and writes JSON in the shipped format."""
from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Optional

import torch

from . import tuning


def _time_ms(run) -> float:
    """Median ms of one launch replayed in a CUDA graph: the GPU time a config controls (eager timing
    of a microsecond kernel mostly measures Python launch work, which no config changes). Every
    tunable launch is sync-free, so it captures; this is the tuner's own graph, never a caller's."""
    from triton.testing import do_bench_cudagraph
    with torch.cuda.stream(torch.cuda.Stream()):
        return float(do_bench_cudagraph(run, rep=40, return_mode="median"))


CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3      # a thread's local memory: where ptxas spills registers


def _local_bytes(run) -> int:
    """The most local memory a thread of any Triton kernel that run() launches uses (nonzero: it
    spills registers; stricter than the offline check, which allows a value parked outside the
    loops, as the driver does not say where the spill is). Read from the driver at launch."""
    import ctypes

    from triton import knobs

    from ._runtime import libcuda
    cuda = libcuda()
    found = [0]

    def record(metadata):
        size = ctypes.c_int()
        status = cuda.cuFuncGetAttribute(ctypes.byref(size), CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
                                         ctypes.c_void_p(metadata.get()["function"]))
        if status:
            raise RuntimeError(f"cuFuncGetAttribute(LOCAL_SIZE_BYTES) returned CUDA error {status}")
        found[0] = max(found[0], size.value)

    knobs.runtime.launch_enter_hook.add(record)
    try:
        run()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook.remove(record)
    return found[0]


def tune_kernel(tunable: tuning.Tunable, shapes: list, family: str, progress: bool = True) -> tuple[dict, list]:
    """Returns ({bucket: best config}, log rows). Each shape's fallback is timed as the baseline;
    candidates that spill registers are timed and logged but never chosen."""
    from tqdm import tqdm
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("refusing to tune during CUDA-graph capture")
    spaces = {id(shape): [c for c in tunable.space(family, shape) if tunable.fits(c, family, shape)]
              for shape in shapes}
    best_by_bucket, log = {}, []
    bar = tqdm(total=sum(len(c) + 1 for c in spaces.values()), desc=f"tune {tunable.name}", disable=not progress)
    for shape in shapes:
        bucket = tunable.bucket(shape)
        fallback = tunable.fallback(shape, family)
        timings, baseline = [], None
        for config in [fallback] + spaces[id(shape)]:
            row = {"kernel": tunable.name, "bucket": bucket, "shape": shape, "config": tunable.to_json(config)}
            try:
                run, _ = tunable.make_run(shape, config)
                spilled = _local_bytes(run)
                row["ms"] = _time_ms(run)
                baseline = row["ms"] if config is fallback else baseline
                if spilled:
                    row["error"] = f"spills registers: {spilled} bytes of local memory a thread"
                else:
                    timings.append((row["ms"], config))
            except Exception as exc:                 # compile errors, OutOfResources, launch failures
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.append(row)
            bar.update(1)
        for ms, config in sorted(timings, key=lambda t: t[0]):
            _, check = tunable.make_run(shape, config)
            err = check()
            if err < tunable.tolerance:              # the fastest config that is also right
                best_by_bucket.setdefault(bucket, (ms, config, baseline))   # one tuning shape per bucket
                break
            log.append({"kernel": tunable.name, "bucket": bucket, "shape": shape,
                        "config": tunable.to_json(config), "error": f"wrong result: relative error {err:.2e}"})
    bar.close()
    return {b: {"config": tunable.to_json(c), "ms": ms, "fallback_ms": base}
            for b, (ms, c, base) in best_by_bucket.items()}, log


def tune(names: Optional[list] = None, shapes: Optional[list] = None, out_dir: Optional[str] = None,
         progress: bool = True) -> str:
    """Tune the named kernels (default: all) and write <out_dir>/<device>.json; returns the path."""
    import triton
    name, family = tuning.current_device()
    if name == "cpu":
        raise SystemExit("tune needs a CUDA GPU")
    out_dir = out_dir or os.environ.get("FUSED_OPS_CONFIG_DIR") or tuning.CONFIG_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tuning.device_key(name)}.json")
    result = {"device": name, "family": family, "triton": triton.__version__, "torch": torch.__version__,
              "date": _dt.date.today().isoformat(), "source": "tuner", "kernels": {}, "speedup_vs_fallback": {}}
    if os.path.exists(path):                         # keep what this run does not retune
        with open(path) as f:
            old = json.load(f)
        result["kernels"] = old.get("kernels", {})
        result["speedup_vs_fallback"] = old.get("speedup_vs_fallback", {})
    failures, full_log = 0, []
    for kname in names or list(tuning.TUNABLES):
        tunable = tuning.TUNABLES[kname]
        best, log = tune_kernel(tunable, shapes or tunable.shapes, family, progress)
        failures += sum("error" in r for r in log)
        full_log += log
        # buckets tuned now replace their old entries; other buckets are kept
        result["kernels"].setdefault(kname, {}).update({b: v["config"] for b, v in best.items()})
        result["speedup_vs_fallback"].setdefault(kname, {}).update(
            {b: round(v["fallback_ms"] / v["ms"], 3) if v["fallback_ms"] else None for b, v in best.items()})
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    log_path = path[: -len(".json")] + ".tune-log.jsonl"     # every candidate: time or failure
    with open(log_path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in full_log)
    tuning.clear_caches()
    print(f"wrote {path} and {log_path} ({failures} candidate failures recorded and skipped)")
    return path
