"""Checks of tensor values (lengths and offsets in range) that do not stall the host early.

A value check reads device values on the host: a sync, which waits for everything queued on the
stream. Done first thing in a call, it leaves the GPU idle while the host does the rest of its
work for the launch. Here each check's scalars are reduced on the device and all of them cross to
the host in one copy that does not wait; `verify()` waits for that copy and raises the first
failure. A caller that verifies just before its kernel launch overlaps its host work with the
wait, and still raises before the kernel runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ._checks import can_sync

# a rule gets its scalars' values, in order, and returns an error message or None
Rule = Callable[[list], Optional[str]]


class ValueChecks:
    """Rules on device scalars: `add` them, `start()` the copy, `verify()` before using the values."""

    def __init__(self):
        self._scalars: list[torch.Tensor] = []
        self._rules: list[tuple[int, int, Rule]] = []
        self._host: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None

    def add(self, source: torch.Tensor, scalars: Callable[[], Sequence[torch.Tensor]], rule: Rule, *,
            force: bool = False) -> None:
        """A rule on the 0-d integer tensors that `scalars()` computes from `source`. Skipped, and
        nothing computed, where the source's values cannot be read now (can_sync: compile
        tracing, CUDA-graph capture), unless `force` (the caller has made sure a read is allowed)."""
        if force or can_sync(source):
            values = [s.to(torch.int64) for s in scalars()]
            self._rules.append((len(self._scalars), len(values), rule))
            self._scalars += values

    def start(self) -> "ValueChecks":
        """Queue the one device->host copy of every scalar (once); returns self."""
        if self._scalars and self._host is None:
            values = torch.stack(self._scalars)
            if values.is_cuda:
                # non_blocking lands in pinned memory: the host goes on until verify()
                self._host = values.to("cpu", non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(torch.cuda.current_stream(values.device))
            else:
                self._host = values
        return self

    def verify(self) -> None:
        """Wait for the copy and raise ValueError with the first failing rule's message."""
        if self._host is None:
            return
        if self._copied is not None:
            self._copied.synchronize()
        values = self._host.tolist()
        for first, count, rule in self._rules:
            message = rule(values[first:first + count])
            if message is not None:
                raise ValueError(message)
