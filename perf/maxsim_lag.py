"""MaxSim with the row maxima one chunk behind the dot: each trip issues the dot of its chunk, then
takes the row maxima of the previous chunk's similarities (carried in registers), so that the
tensor cores could run beside the maxima within one program instead of only across the two
programs an SM holds. That needs Triton to leave the dot asynchronous past the maxima (its
warp_group_dot_wait after the reduce, or pendings > 0). Prints, for the shipped tile's sm_90
build of both kernels, the registers, the loop's machine instructions and the order of the dot,
its wait, the row-max reduce and the loads (asynchronous copies and their waits, or plain loads)
in the loop's TTGIR.

    python -m perf.maxsim_lag            (offline: triton without TRITON_INTERPRET, no GPU needed)
"""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re

from perf.variants import edited_module

maxsim = importlib.import_module("fused_ops.maxsim")

# the loop's code that takes a chunk's row maxima and ends a document, read from the library's source
# (from the row max to the document counter's step) so that the edit always matches it
_SOURCE = pathlib.Path(maxsim.__file__).read_text()
_TAKE = _SOURCE[_SOURCE.index("        m = tl.maximum(m, tl.where(length > 0"):
                _SOURCE.index("        n += last.to(tl.int32)\n")]
_ADVANCE = """        n += last.to(tl.int32)
"""


def _take(indent: str) -> str:
    """_TAKE on the previous chunk's values, at an indent."""
    text = _TAKE.replace("(sim,", "(sim_prev,").replace("length > 0", "length_prev > 0")
    text = text.replace("last = length <= BLOCK_D", "last_prev = length_prev <= BLOCK_D")
    text = text.replace("if last:", "if last_prev:").replace("(n - n0)", "(n_prev - n0)")
    text = text.replace("== n - n0,", "== n_prev - n0,")
    return "".join(indent + line[8:] + "\n" if line else "\n" for line in text.splitlines())


EDITS = [
    ("    for _step in range(0, n_chunks):\n",
     "    sim_prev = tl.full([BLOCK_Q, BLOCK_D], float(\"-inf\"), tl.float32)\n"
     "    length_prev = BLOCK_D + 1                                  # before the first chunk: not a last, max -inf\n"
     "    n_prev = n0\n"
     "    for _step in range(0, n_chunks):\n"),
    (_TAKE + _ADVANCE,
     _take(" " * 8)
     + "        sim_prev = sim\n        length_prev = length\n        n_prev = n\n"
     + "        last = length <= BLOCK_D\n" + _ADVANCE),
    ("    # wanted from here on only,", _take(" " * 4) + "    # wanted from here on only,"),
]


def lagged():
    return edited_module(maxsim, EDITS, "lag")


def _loop_ir(ttgir: str) -> list[str]:
    """The ops of the chunk loop's body (the loop whose trip count is n_chunks, up to its own
    yield) that order the dot, its wait, the row-max reduce and the chunk's load."""
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if "scf.for" in line and "n_chunks" in line)
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" " * indent + "scf.yield"))
    ops = []
    for line in lines[start + 1:end]:
        found = re.search(r"warp_group_dot_wait .*pendings = \d+|warp_group_dot |async_wait|async_copy_global_to_local"
                          r"|\"tt\.reduce\"\(%\w+|tt\.load %chunk", line)
        if found:
            ops.append(re.sub(r"warp_group_dot_wait .*pendings = ", "dot_wait pendings=", found.group(0)).strip())
    return ops


def main() -> None:
    from fused_ops import offline as off
    import triton
    variant = lagged()
    print(f"triton {triton.__version__}, sm_90")
    for build in maxsim.offline_builds():
        if build.name != "maxsim_bf16_d128_scores_q8_BQ256_BD64_w8_s3":
            continue
        for name, kernel in (("shipped", maxsim.maxsim_kernel), ("lagged", variant.maxsim_kernel)):
            compiled = off._compile(dataclasses.replace(build, kernel=kernel), 90)
            registers = off._resource_usage(compiled.asm["cubin"])["REG"]
            loop = off.loop_opcodes(dataclasses.replace(build, kernel=kernel), 90)
            print(f"{build.name} {name}: {registers} registers, {sum(loop.values())} instructions a trip; "
                  f"the loop's order: {' -> '.join(_loop_ir(compiled.asm['ttgir']))}", flush=True)


if __name__ == "__main__":
    main()
