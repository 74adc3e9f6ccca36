"""Launch plans: repeated eager calls without re-deriving a launch each time.

An eager call at a few rows is bound by the CPU: deriving the config, the cached parameter terms,
the scratch and the launch arguments, then Triton's binding and cache lookup, cost tens of
microseconds against a kernel of a few (fused_router; layernorm_linear's statistics pass and
gemm at a few hundred rows). Where a call must sync with the device
first (MaxSim's range checks), that host work after the sync leaves the GPU idle, whatever the
kernel's length (maxsim). A plan keeps what a launch derived from everything but
its per-call tensors: the compiled kernel, the grid, and the kernel's arguments in signature
order. A later call with the same key (the caller's: stream, shapes, strides, dtypes, alignment,
scalars, parameter identities) checks that the parameters are still the same tensors at the same
version and storage, puts its own tensors in the plan's slots and launches the compiled kernel.

The key must hold everything Triton specializes a launch on (dtypes, 16-byte alignment of
pointers, integer values 1 and multiples of 16), or a plan could launch a kernel compiled for
other arguments: callers key on exact shapes and strides and on the alignment of the per-call
inputs (per-call outputs are fresh allocations, which the caching allocator aligns); the
parameters' pointers are in the stamp. Plans are not built or used under CUDA-graph
capture (captures take fresh scratch), under the interpreter, or for inference-mode parameters
(which keep no version to check).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ._runtime import INTERPRET

MAX_PLANS = 64      # per kernel; the least recently built plan goes first


def version_stamp(tensors) -> Optional[tuple]:
    """Who each tensor is, its version and its storage (a `.data =` assignment keeps the version);
    None where one keeps no version (inference tensors)."""
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tuple(None if t is None else (weakref.ref(t), t._version, t.data_ptr()) for t in tensors)


def same_stamp(stamp, tensors) -> bool:
    for s, t in zip(stamp, tensors):
        if s is None or t is None:
            if s is not t:
                return False
        elif s[0]() is not t or s[1] != t._version or s[2] != t.data_ptr():
            return False
    return True


def plans_apply(device: torch.device) -> bool:
    """Whether a launch on `device` may use or build plans now."""
    return device.type == "cuda" and not INTERPRET and not torch.cuda.is_current_stream_capturing()


def current_stream(device: torch.device) -> int:
    """The raw handle of `device`'s current stream (part of every key: scratch is per stream)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


@dataclass
class Plan:
    stamp: tuple
    kernel: object          # triton's CompiledKernel
    grid: tuple
    args: list              # every kernel argument in signature order, constexprs included
    slots: tuple            # positions in `args` of the per-call tensors, in the caller's order
    extra: tuple = ()       # what else the caller keeps with the plan (e.g. its output's shape)

    def launch(self, *tensors) -> None:
        args = list(self.args)
        for slot, t in zip(self.slots, tensors):
            args[slot] = t
        self.kernel[self.grid](*args)


class LaunchPlans:
    """Plans of one @triton.jit kernel, by the caller's key and torch's tf32 setting (float32 dots
    read it: a plan recorded under one setting is not replayed under the other)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._plans: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def find(self, key, params) -> Optional[Plan]:
        """The plan of `key` if its parameters are still the same tensors, version and storage."""
        plan = self._plans.get((key, torch.backends.cuda.matmul.allow_tf32))
        return plan if plan is not None and same_stamp(plan.stamp, params) else None

    def record(self, key, params, compiled, grid, args: tuple, kwargs: dict, slots: tuple, extra: tuple = ()) -> None:
        """Keep the launch just made (`compiled` is what kernel[grid](*args, **kwargs) returned);
        `slots` names the per-call tensor arguments."""
        stamp = version_stamp(params)
        if stamp is None or compiled is None:
            return
        names = self.kernel.arg_names
        by_name = dict(zip(names, args), **{n: v for n, v in kwargs.items() if n in names})
        by_name.update(dict.fromkeys(slots))        # the plan must not keep this call's tensors alive
        plan = Plan(stamp, compiled, tuple(grid) + (1,) * (3 - len(grid)), [by_name[n] for n in names],
                    tuple(names.index(s) for s in slots), extra)
        with self._lock:
            self._plans[key, torch.backends.cuda.matmul.allow_tf32] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
