# Two entry points from a fresh clone: `make demo` and `make test`.
# Each builds .venv on first use. Where no torch is installed, the CPU build is pinned first so
# that resolving `triton` and the dev extras never pulls the multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test info bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m fused_ops demo

info: $(VENV)/.installed
	$(BIN)/python -m fused_ops info

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed
	$(BIN)/python -m perf

clean:
	rm -rf $(VENV) build *.egg-info
