"""Offline compilation of shipped kernel configs for GPUs we cannot run on.

`triton.compile` with an explicit GPUTarget builds a cubin for any compute capability on any
machine (no GPU needed). From it we read shared memory (Triton's metadata) and registers, stack
and local memory (cuobjdump's resource usage), and which matrix instructions the PTX uses.
Each op module lists the builds its launcher can choose in `offline_builds()`.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace

from ._runtime import FP_FUSION
from .tuning import FAMILY_CC, SHARED_LIMIT as _FAMILY_SHARED

SHARED_LIMIT = {cc: _FAMILY_SHARED[family] for family, cc in FAMILY_CC.items()}   # bytes per block
TARGETS = tuple(SHARED_LIMIT)
# the tensor-core instruction each target's dots should lower to
DOT_INSTRUCTION = {90: "wgmma", 100: "tcgen05.mma", 120: "mma.sync", 80: "mma.sync"}
OP_MODULES = ("softmax", "topk", "layernorm_linear", "router", "moe", "maxsim")


@dataclass
class KernelBuild:
    """One kernel at one config, exactly as a launcher would launch it."""
    name: str
    kernel: object                       # a triton JITFunction
    types: dict                          # runtime arg name -> Triton type string ("*bf16", "i32", "fp32")
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False
    targets: tuple = TARGETS             # where this build ships (a config may be for one family only)
    divisible: tuple = ()                # int args the JIT would see as multiples of 16 (shapes, strides)
    max_registers: int = 0               # ptxas' per-thread cap (maxnreg) the launch passes; 0: none


@dataclass
class BuildReport:
    name: str
    cc: int
    shared: int
    registers: int
    stack: int
    local: int
    dot_instruction: str                 # the DOT_INSTRUCTION found in the PTX, or "" if none
    notes: list = field(default_factory=list)
    loop_spills: int = 0                 # spill stores and loads (STL, LDL) inside the machine code's loops
    slot_races: list = field(default_factory=list)   # shared_slot_races' findings

    @property
    def fits(self) -> bool:
        """Within the target's shared memory, no local arrays, no spill inside a loop and no slot
        race. ptxas may park a value that only the code after the main loop reads in the stack
        frame (one store and one load a program): that costs nothing measurable, where a spill in
        a loop costs every trip."""
        return (self.shared <= SHARED_LIMIT[self.cc] and self.local == 0 and self.loop_spills == 0
                and not self.slot_races)


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def _compile(build: KernelBuild, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in build.kernel.arg_names:
        signature[name] = "constexpr" if name in build.constexprs else build.types[name]
    # pointers are 16-byte aligned, as torch allocations are
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(build.kernel.arg_names)
             if signature[n].startswith("*") or n in build.divisible}
    src = ASTSource(build.kernel, signature, constexprs=dict(build.constexprs), attrs=attrs)
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages, "enable_fp_fusion": FP_FUSION}
    if build.max_registers:
        options["maxnreg"] = build.max_registers
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def shared_slot_races(ttgir: str) -> list[str]:
    """Pipelined shared-memory buffers that an asynchronous wgmma reads (a warp_group_dot whose wait
    leaves dots pending) while registers also read them (a local_load). Triton 3.6 and 3.9 give such a
    load one slot fewer than a dot-only load, so the copy issued in a step can rewrite the slot the
    step's dot is still reading: results off by a little and different on each run
    (perf/results/NVIDIA_H200/router_slot_race.txt). Names the buffers; none where every wait is
    immediate (pendings = 0)."""
    if not re.search(r"warp_group_dot_wait .*pendings = [1-9]", ttgir):
        return []
    races = []
    for buffer in re.findall(r"(%[\w.#-]+) = ttg\.local_alloc\s*:\s*\(\)", ttgir):
        slots = re.findall(rf"(%[\w.#-]+) = ttg\.memdesc_(?:index|subview) {re.escape(buffer)}\[", ttgir)
        read = lambda pattern: any(re.search(pattern.format(re.escape(slot)), ttgir) for slot in slots)  # noqa: E731
        if read(r"ttg\.local_load {}\b") and read(r"warp_group_dot (?:\S+, )?{}\b"):
            races.append(buffer)
    return races


def compile_build(build: KernelBuild, cc: int) -> BuildReport:
    compiled = _compile(build, cc)
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    instruction = DOT_INSTRUCTION[cc] if DOT_INSTRUCTION[cc] in ptx else ""
    loop_spills = 0
    if usage.get("STACK", 0) or usage.get("LOCAL", 0):
        code = _sass(compiled.asm["cubin"])
        loop_spills = sum(op in ("STL", "LDL") for start, end in _loops(code)
                          for at, op, _ in code if start <= at <= end)
    return BuildReport(build.name, cc, shared=compiled.metadata.shared, registers=usage.get("REG", 0),
                       stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0), dot_instruction=instruction,
                       loop_spills=loop_spills, slot_races=shared_slot_races(compiled.asm["ttgir"]))


def _sass(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each machine instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    code = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass)
    return [(int(address, 16), op, operands) for address, op, operands in code]


def _loops(code) -> list[tuple[int, int]]:
    """(target, branch) address spans of the loops: backward branches over no EXIT (ptxas puts
    some blocks after the kernel's end, and their branches back span the whole kernel)."""
    exits = [at for at, op, _ in code if op == "EXIT"]
    return [(target, at) for at, op, operands in code if op == "BRA"
            for target in [int(m, 16) for m in re.findall(r"0x([0-9a-f]+)", operands)]
            if target < at and not any(target <= e <= at for e in exits)]


def loop_opcodes(build: KernelBuild, cc: int) -> Counter:
    """Opcode counts of the machine code in the build's longest loop (from the backward branch that
    spans the most instructions to its target): what one trip of a kernel's main loop issues."""
    code = _sass(_compile(build, cc).asm["cubin"])
    loops = _loops(code)
    if not loops:
        return Counter()
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return Counter(op for at, op, _ in code if start <= at <= end)


def all_builds() -> list[KernelBuild]:
    import importlib
    builds = []
    for name in OP_MODULES:
        module = importlib.import_module(f"fused_ops.{name}")
        if hasattr(module, "offline_builds"):
            builds += module.offline_builds()
    return builds


def dtype_name(dtype) -> str:
    import torch
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _report(build: KernelBuild, cc: int) -> BuildReport:
    """The build's report on one target; a compile failure (any, not only OutOfResources) becomes its note."""
    try:
        return compile_build(build, cc)
    except Exception as exc:
        return BuildReport(build.name, cc, -1, -1, -1, -1, "", [f"{type(exc).__name__}: {exc}"])


_WORKER_BUILDS: list = []


def _worker_start() -> None:
    _WORKER_BUILDS.extend(all_builds())


def _worker_report(job: tuple[int, int]) -> BuildReport:
    index, cc = job
    return _report(_WORKER_BUILDS[index], cc)


def _compile_key(build: KernelBuild, cc: int) -> tuple:
    """All that a build's machine code depends on: builds alike in it (one config shipped in several
    buckets or files) compile once."""
    return (build.kernel.fn.__module__, build.kernel.__name__, tuple(sorted(build.types.items())),
            tuple(sorted((name, repr(value)) for name, value in build.constexprs.items())), build.num_warps,
            build.num_stages, build.max_registers, tuple(build.divisible), cc)


def report_all(targets=TARGETS) -> list[BuildReport]:
    """Every build compiled for every target it ships on, in that order. Each distinct build compiles
    once, in one process per CPU this process may use, each of which lists the builds itself (the
    kernels are not picklable); ptxas and Triton's passes are single-threaded, so the processes
    divide the time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm
    builds = all_builds()
    jobs = [(index, cc) for index, build in enumerate(builds) for cc in targets if cc in build.targets]
    distinct = {}                                   # compile key -> the first job that has it
    for index, cc in jobs:
        distinct.setdefault(_compile_key(builds[index], cc), (index, cc))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(usable, len(distinct))
    # a progress bar where stderr is a terminal (disable=None), none in the tests' subprocess
    bar = functools.partial(tqdm, total=len(distinct), desc=f"compiling ({workers} processes)", disable=None)
    if workers <= 1:
        reports = [_report(builds[index], cc) for index, cc in bar(distinct.values())]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_start) as pool:
            reports = list(bar(pool.map(_worker_report, distinct.values())))
    by_key = dict(zip(distinct, reports))
    return [replace(by_key[_compile_key(builds[index], cc)], name=builds[index].name)
            for index, cc in jobs]


def main(argv=None) -> None:
    """python -m fused_ops.offline [--json]: the kernel x target table (needs no GPU)."""
    import argparse
    import json
    import sys
    parser = argparse.ArgumentParser(prog="python -m fused_ops.offline",
                                     description="Compile every shipped kernel config for sm_90, sm_100, sm_120 and "
                                                 "sm_80 (no GPU needed) and print shared memory, registers, spills "
                                                 "and the tensor-core instruction of each.")
    parser.add_argument("--json", action="store_true", help="the reports as JSON on stdout instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("offline compilation needs TRITON_INTERPRET unset")
    reports = report_all()
    if args.json:
        json.dump([{**r.__dict__, "fits": r.fits} for r in reports], sys.stdout)
        return
    print(f"{'kernel config':<34} {'target':>6} {'shared B':>9} {'regs':>5} {'stack':>5} {'local':>5} "
          f"{'dot instr.':>11}  fits")
    for r in reports:
        print(f"{r.name:<34} {'sm_' + str(r.cc):>6} {r.shared:>9} {r.registers:>5} {r.stack:>5} {r.local:>5} "
              f"{r.dot_instruction or '-':>11}  {'yes' if r.fits else 'NO ' + ' '.join(r.notes)}")


if __name__ == "__main__":
    main()
