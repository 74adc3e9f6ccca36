"""Where each op runs, and small launcher helpers shared by every op file."""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (the CPU test suite) the Triton kernels run on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors go to the kernels; CPU tensors to the reference unless the interpreter is on."""
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with a unit stride on the last dim (copies only when it must)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def dot_upcast(*tensors: torch.Tensor) -> bool:
    """The interpreter's tl.dot on two bf16 operands is wrong (triton 3.9): upcast there only."""
    return INTERPRET and any(t.dtype == torch.bfloat16 for t in tensors)
