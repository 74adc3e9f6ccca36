"""Argument validation shared by every op.

Each helper raises ValueError or TypeError with a message that names the op and the argument and
says what was expected and what was given. Only metadata is inspected here (shape, dtype, device);
value checks that would need a device sync live with the op that needs them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(op: str, name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           kind: str = "float") -> torch.Tensor:
    """Check that `t` is a tensor of the right kind ("float" or "index") and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if kind == "float" and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be a floating tensor (float32, float16 or bfloat16), "
                        f"got {_describe(t)}")
    if kind == "index" and t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: `{name}` must be an int32 or int64 tensor, got {_describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dimension(s), got {_describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: `{name}` must have at least {min_ndim} dimension(s), got {_describe(t)}")
    return t


def optional_tensor(op: str, name: str, t, **kw) -> Optional[torch.Tensor]:
    return None if t is None else tensor(op, name, t, **kw)


def same_device(op: str, named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    """All non-None tensors must live on the device of the first one."""
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                             f"all tensors must be on one device")


def same_dtype(op: str, named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{first_name}` has {first.dtype}; "
                            f"all floating inputs must share one dtype")


def shape(op: str, name: str, t: Optional[torch.Tensor], expected: Sequence[int], why: str = "") -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{op}: `{name}` must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def _finite_number(op: str, name: str, value, above_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: `{name}` must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 if above_zero else value >= 0)):
        raise ValueError(f"{op}: `{name}` must be finite and {'>' if above_zero else '>='} 0, got {value}")
    return float(value)


def positive_finite(op: str, name: str, value) -> float:
    return _finite_number(op, name, value, above_zero=True)


def nonnegative_finite(op: str, name: str, value) -> float:
    return _finite_number(op, name, value, above_zero=False)


def k_in_range(op: str, k, upper: int, upper_name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: `k` must be an int, got {type(k).__name__}")
    if not 1 <= k <= upper:
        raise ValueError(f"{op}: `k` must satisfy 1 <= k <= {upper_name} = {upper}, got k = {k}")
    return k


def choice(op: str, name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{op}: `{name}` must be one of {list(allowed)}, got {value!r}")
    return value


def can_sync(t: torch.Tensor) -> bool:
    """Value checks read tensor values: not while torch.compile traces (the values are symbolic),
    and on CUDA not during graph capture (a sync)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type != "cuda":
        return True
    return not torch.cuda.is_current_stream_capturing()
