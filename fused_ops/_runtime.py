"""Where each op runs, and small launcher helpers shared by every op file."""
from __future__ import annotations

import ctypes
import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# Under TRITON_INTERPRET=1 (the CPU test suite) the Triton kernels run on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter has no device to ask: a small SM count makes CPU tests reach the multi-program
# paths (split-K, several row blocks) that real GPUs take at larger sizes.
INTERPRET_SM_COUNT = 4
INTERPRET_SHARED_MEMORY = 232448

# Every launch passes it: Triton 3.9 warns where a launch leaves it unset and 3.10 turns the default
# off, and the kernels' numbers were measured with multiply-adds fused (Triton's default until then).
FP_FUSION = True
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors go to the kernels; CPU tensors to the reference unless the interpreter is on."""
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def skips_dispatcher(*tensors) -> bool:
    """Whether an op on these tensors (None for absent ones) may run its function directly instead
    of through its custom op (the dispatcher costs ~20 us of Python a call, more than a small kernel
    takes): plain CUDA tensors, in eager mode, with no dispatch mode or functorch transform (vmap,
    grad, functionalize) active and no tensor that autograd would track. Everything else goes
    through the registered op, which FakeTensors, transforms and autograd know how to handle."""
    first = tensors[0]
    if not (type(first) is torch.Tensor and first.is_cuda):
        return False
    if (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or torch._C._are_functorch_transforms_active()):
        return False
    tracked = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (tracked and t.requires_grad)) for t in tensors)


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with a unit stride on the last dim (copies only when it must)."""
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def dot_upcast(*tensors: torch.Tensor) -> bool:
    """The interpreter's tl.dot on two bf16 operands is wrong (triton 3.9): upcast there only."""
    return INTERPRET and any(t.dtype == torch.bfloat16 for t in tensors)


def row_tiles(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that hold whole rows in registers: about 2K
    elements per program (several short rows or one long one), at most 32 values per thread."""
    block_n = pow2(n_cols)
    block_m = max(1, min(64, 2048 // block_n, pow2(n_rows)))
    return block_m, block_n, max(1, min(32, block_m * block_n // 512))


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> tuple[int, int, int, int, int]:
    """(SMs, opt-in shared memory a program, registers an SM, shared memory an SM, threads an SM)."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    torch_props = torch.cuda.get_device_properties(index)
    return (props["multiprocessor_count"], props["max_shared_mem"], props["max_num_regs"],
            torch_props.shared_memory_per_multiprocessor, torch_props.max_threads_per_multi_processor)


def _limit(device: torch.device, which: int) -> int:
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())[which]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (grid sizing)."""
    return INTERPRET_SM_COUNT if device.type != "cuda" else _limit(device, 0)


def max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per program in bytes (232448 on sm_90/sm_100, 101376 on sm_120)."""
    return INTERPRET_SHARED_MEMORY if device.type != "cuda" else _limit(device, 1)


def max_registers(device: torch.device) -> int:
    """32-bit registers a program may hold, all of an SM's (65536 on sm_80 to sm_120)."""
    return _limit(device, 2)


def sm_shared_memory(device: torch.device) -> int:
    """Shared memory of one SM in bytes, what its resident programs share (233472 on sm_90/sm_100)."""
    return _limit(device, 3)


def sm_threads(device: torch.device) -> int:
    """Threads one SM holds at once (2048 on sm_90/sm_100, 1536 on sm_120)."""
    return _limit(device, 4)


# cuFuncSetAttribute's CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, and its "all of it" (percent)
PREFERRED_CARVEOUT, ALL_SHARED = 9, 100


@functools.lru_cache(maxsize=1)
def libcuda():
    return ctypes.CDLL("libcuda.so.1")


def prefer_all_shared(kernel) -> bool:
    """Asks the driver to configure an SM that runs this compiled kernel with all its shared memory
    (the rest of the SM's on-chip memory is L1), so that a program of another kernel that needs
    most of it can run there beside this one; False where the driver cannot be reached or refuses.
    Without it an SM that runs the kernel keeps a small shared-memory split until it is empty
    (layernorm_linear's statistics pass beside the gemm: ln_stats_beside.txt, run 5)."""
    kernel._init_handles()
    try:
        cu_func_set_attribute = libcuda().cuFuncSetAttribute
    except (OSError, AttributeError):
        return False
    return cu_func_set_attribute(ctypes.c_void_p(kernel.function), PREFERRED_CARVEOUT, ALL_SHARED) == 0


# families whose GEMMs read tiles through the bulk copy engine (TMA); sm_120 spills there
TMA_FAMILIES = (9, 10)
PDL_MIN_MAJOR = 9         # programmatic dependent launch (griddepcontrol) assembles from sm_90 on


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can cover these [rows, n] tensors: a TMA family, 16-byte aligned
    bases and row strides, unit last stride (never under the interpreter)."""
    return all(t.is_cuda and not INTERPRET and torch.cuda.get_device_capability(t.device)[0] in TMA_FAMILIES
               and t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0
               for t in tensors)


def gemm_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision of the compute-bound dots (layernorm_linear's gemm, moe_experts',
    MaxSim's): float32 takes one tf32 product where torch allows tf32 (SPEC: Dtypes), else three
    (tf32x3: a = a_hi + a_lo, float32's accuracy on the tensor cores; perf/ln_fp32_tf32x3.py,
    perf/moe_fp32_tf32x3.py, perf/maxsim_fp32.py) where the GPU has tf32, else the FMA units; the
    setting does not affect 16-bit operands."""
    one = dot_precision(dtype)
    if one == "ieee" and dtype == torch.float32 and device.type == "cuda":
        return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"
    return one


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 gets tf32 only where torch would use it (SPEC: Dtypes);
    the setting does not affect 16-bit operands."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
