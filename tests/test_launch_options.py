"""Every kernel launch in the package states the options Triton's defaults are about to change.

Triton 3.9 warns on a launch that leaves enable_fp_fusion unset and 3.10 turns its default off; the
interpreter ignores the option, so this reads the source: each `<kernel>[grid](...)` call passes it.
"""
import ast
import pathlib

import fused_ops

PACKAGE = pathlib.Path(fused_ops.__file__).parent


def _launches(tree: ast.AST):
    """Calls of the form name[grid](...) on a name defined with @triton.jit (ends in _kernel)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            if isinstance(target, ast.Name) and target.id.endswith("_kernel"):
                yield target.id, node


def test_every_launch_passes_fp_fusion():
    launches, missing = 0, []
    for path in sorted(PACKAGE.glob("*.py")):
        for name, call in _launches(ast.parse(path.read_text())):
            launches += 1
            if "enable_fp_fusion" not in {k.arg for k in call.keywords}:
                missing.append(f"{path.name}:{call.lineno} {name}")
    assert launches >= 20, launches
    assert not missing, missing
