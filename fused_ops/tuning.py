"""The one place that owns kernel configs.

A tunable kernel registers a `Tunable` (in tunables.py): its config space per GPU family, how a
shape maps to a bucket (token counts are bucketed so a new batch size does not retune), its
built-in fallback, and how to run and check one config. A launcher asks for the JSON entry of its
bucket (`fused_ops/configs/<device>.json`, then `<family>.json`, parsed) through `tuned_config`,
or through `config_for` where the fallback depends on the bucket alone; without an entry it runs
its built-in fallback.

Adding a kernel: in the kernel's module, a frozen config dataclass, a bucket function, the
fallback, a `from_json` parser (the JSON entry is the dataclass's asdict), and a launcher that
takes `config=` and otherwise asks `config_for` (or `tuned_config`); in tunables.py, its space,
`fits`, `make_run` and `register(Tunable(...))`; in the module's `offline_builds()`, its
fallbacks and every entry of `shipped_entries(name)`, so the offline test compiles each shipped
entry for its family.

Environment:
  FUSED_OPS_FALLBACK_CONFIGS=1   ignore every JSON: built-in fallback configs only (no tuning)
  FUSED_OPS_CONFIG_DIR=/path     a folder of the user's own JSON, searched before the shipped ones
"""
from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
SHARED_LIMIT = {"sm_90": 232448, "sm_100": 232448, "sm_120": 101376, "generic": 101376}
# the compute capability each family is compiled for offline; "generic" (Ampere and Ada: no TMA, no wgmma,
# mma.sync dots) is proven on sm_80
FAMILY_CC = {"sm_90": 90, "sm_100": 100, "sm_120": 120, "generic": 80}
# kernel -> the kernel whose entry of the same bucket it takes in a file that has none of its own
# (maxsim's top-k path runs the scoring path's kernel, on its own tile where one was tuned)
ENTRY_FALLBACK = {"maxsim_topk": "maxsim"}


def family_of(major: int, minor: int = 0) -> str:
    if major == 9:
        return "sm_90"
    if major == 10:
        return "sm_100"
    if major == 12:
        return "sm_120"
    return "generic"


@functools.lru_cache(maxsize=None)
def device_family(device) -> str:
    """The family of a tensor's device ("generic" for the interpreter's CPU tensors); cached: the
    launch paths ask on every call."""
    if device.type != "cuda":
        return "generic"
    import torch
    return family_of(*torch.cuda.get_device_capability(device))


def device_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (the shipped file name)."""
    return "".join(c if c.isalnum() else "_" for c in name.strip())


@functools.lru_cache(maxsize=4096)
def pow2_bucket(**dims: int) -> str:
    """The JSON key of a shape: each size rounded up to a power of two, so a new batch size does not
    retune (M=100, N=40 -> "M128_N64"). Cached: launchers ask on every call."""
    return "_".join(f"{name}{1 << max(0, size - 1).bit_length()}" for name, size in dims.items())


@dataclass
class Tunable:
    """A kernel (or kernel pipeline) whose launch config can be tuned.

    space(family, shape)         candidate configs for that family and shape
    fits(config, family, shape)  static pruning by that family's shared memory and register budget
    bucket(shape)                the JSON key a shape's config is stored under
    fallback(shape, family)      the built-in config the launcher takes for that shape when no
                                 JSON entry matches (the tuner's baseline)
    make_run(shape, config)      -> (run, check): run() launches once on CUDA; check() returns the
                                 relative error of that config's output against the reference
    parse / to_json              JSON entry <-> config object (to_json: dataclasses.asdict unless given)
    shapes                       default tuning shapes (dicts of ints)
    """
    name: str
    space: Callable[[str, dict], list]
    fits: Callable[[object, str, dict], bool]
    bucket: Callable[[dict], str]
    fallback: Callable[[dict, str], object]
    make_run: Callable
    parse: Callable[[dict], object]
    shapes: list = field(default_factory=list)
    to_json: Callable[[object], dict] = asdict
    tolerance: float = 1e-2


TUNABLES: dict[str, Tunable] = {}


def register(tunable: Tunable) -> Tunable:
    TUNABLES[tunable.name] = tunable
    return tunable


def _search_dirs() -> list[str]:
    user = os.environ.get("FUSED_OPS_CONFIG_DIR")
    return ([user] if user else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=None)
def _load(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_files(device_name: str, family: str) -> list[tuple[str, dict]]:
    """The JSON files that apply to a device, most specific first: (path, contents)."""
    found = []
    for folder in _search_dirs():
        for stem in (device_key(device_name), family):
            path = os.path.join(folder, f"{stem}.json")
            data = _load(path)
            if data is not None:
                found.append((path, data))
    return found


_device_lock = threading.Lock()
_device_cache: dict[int, tuple[str, str]] = {}


def current_device() -> tuple[str, str]:
    """(name, family) of the current CUDA device; ('cpu', 'generic') without one."""
    import torch
    if not torch.cuda.is_available():
        return "cpu", "generic"
    index = torch.cuda.current_device()
    with _device_lock:
        if index not in _device_cache:
            props = torch.cuda.get_device_properties(index)
            _device_cache[index] = (props.name, family_of(props.major, props.minor))
        return _device_cache[index]


def lookup(kernel: str, bucket: str, device_name: str, family: str) -> tuple[Optional[dict], str]:
    """(JSON entry or None, where it came from) for one kernel and bucket on a named device."""
    if os.environ.get("FUSED_OPS_FALLBACK_CONFIGS") == "1":
        return None, "fallback (FUSED_OPS_FALLBACK_CONFIGS=1)"
    for path, data in config_files(device_name, family):
        for name in (kernel, ENTRY_FALLBACK.get(kernel)):
            entry = data.get("kernels", {}).get(name, {}).get(bucket)
            if entry is not None:
                whose = "" if name == kernel else f", {name}'s entry"
                return entry, f"{os.path.basename(path)} ({data.get('source', '?')}, triton {data.get('triton', '?')}{whose})"
    return None, "built-in fallback (no JSON entry)"


@functools.lru_cache(maxsize=4096)
def _tuned(kernel: str, bucket: str, device_name: str, family: str, parse: Callable):
    entry, _ = lookup(kernel, bucket, device_name, family)
    return None if entry is None else parse(entry)


@functools.lru_cache(maxsize=4096)
def _resolve(kernel: str, bucket: str, device_name: str, family: str, fallback: Callable, parse: Callable):
    tuned = _tuned(kernel, bucket, device_name, family, parse)
    return fallback(bucket, family) if tuned is None else tuned


def tuned_config(kernel: str, bucket: str, parse: Callable[[dict], object]):
    """The JSON entry for this device (then family) parsed by `parse`, or None: for launchers
    whose fallback follows the exact shape. Cached per (kernel, bucket, device); thread-safe;
    never tunes. `parse` must be a module-level function (it is part of the cache key)."""
    name, family = current_device()
    return _tuned(kernel, bucket, name, family, parse)


def config_for(kernel: str, bucket: str, fallback: Callable[[str, str], object], parse: Callable[[dict], object]):
    """The config a launcher uses now: `tuned_config`, else `fallback(bucket, family)`. Cached
    like it; `fallback` too must be a module-level function."""
    name, family = current_device()
    return _resolve(kernel, bucket, name, family, fallback, parse)


_generation = 0


def generation() -> int:
    """How many times the caches were cleared: launch plans key on it, so none outlives the config
    it was built with."""
    return _generation


def clear_caches() -> None:
    """Forget loaded JSON and resolved configs (after writing new JSON or changing the env)."""
    global _generation
    _load.cache_clear()
    _tuned.cache_clear()
    _resolve.cache_clear()
    _generation += 1


def smem_gemm(block_m: int, block_n: int, block_k: int, stages: int, elem_bytes: int = 2) -> int:
    """Shared memory of a software-pipelined GEMM tile: A and B tiles for each stage (an upper
    estimate for pruning; the offline compile reads the real figure)."""
    return (block_m + block_n) * block_k * elem_bytes * stages


def registers_ok(num_warps: int, acc_elems: int) -> bool:
    """The fp32 accumulator must leave room: at most 128 accumulator registers a thread."""
    return acc_elems / (32 * num_warps) <= 128


def shipped_buckets(kernel: str) -> list[tuple[tuple, str, str, dict]]:
    """Every shipped JSON entry of a kernel: (compile targets, file stem, bucket, entry). The
    offline compile test builds each one for the targets of its file's family."""
    import glob
    out = []
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json"))):
        data = _load(path)
        cc = FAMILY_CC.get(data.get("family"))
        targets = (cc,) if cc else tuple(FAMILY_CC.values())
        stem = os.path.basename(path)[: -len(".json")]
        for bucket, entry in sorted(data.get("kernels", {}).get(kernel, {}).items()):
            out.append((targets, stem, bucket, entry))
    return out


def shipped_entries(kernel: str) -> list[tuple[tuple, str, dict]]:
    """shipped_buckets as (compile targets, label '<stem>_<bucket>', entry)."""
    return [(targets, f"{stem}_{bucket}", entry) for targets, stem, bucket, entry in shipped_buckets(kernel)]
