# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build resolves from the local wheel cache here; an open range would pull CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp file: re-run set-up when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The demo writes runs/demo; a rerun replaces the earlier demo run there (and says so), never a run
# of yours elsewhere (plain `python -m train` refuses to overwrite runs/lorafuse).
DEMO_DIR ?= runs/demo

demo: setup
	@if [ -e "$(DEMO_DIR)" ]; then echo "make demo: replacing the earlier demo run in $(DEMO_DIR)"; fi
	$(BIN)/python -m train --output-dir $(DEMO_DIR) --overwrite-output-dir

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
