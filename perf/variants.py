"""Variants of a library module for A/B probes: its source with a few edits, loaded as a sibling."""
from __future__ import annotations

import importlib.util
import pathlib
import sys


def edited_module(module, edits: list[tuple[str, str]], suffix: str):
    """`module` with each (old, new) edit applied to its source (each old text must occur once),
    loaded as the sibling `_<name>_<suffix>` so that its relative imports resolve; the file is
    removed once loaded."""
    source = pathlib.Path(module.__file__).read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    name = module.__name__.rsplit(".", 1)
    path = pathlib.Path(module.__file__).with_name(f"_{name[-1]}_{suffix}.py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{name[0]}._{name[-1]}_{suffix}", path)
    variant = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = variant
    try:
        spec.loader.exec_module(variant)
    finally:
        path.unlink()
    return variant
