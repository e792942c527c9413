# Two commands do all set-up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Both create .venv from uv.lock first (uv itself is installed with pip if missing).
PYTHON ?= python3
VENV := .venv
# PyTorch's huge-page allocator: without it, re-faulting freed activation buffers costs about half of a
# CPU training step at large batch on this machine.
export THP_MEM_ALLOC_ENABLE := 1

.PHONY: demo test

$(VENV)/.synced: pyproject.toml uv.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv sync --frozen --compile-bytecode
	touch $@

demo: $(VENV)/.synced
	$(VENV)/bin/python recipes/two_moon.py --seeds 20 --out runs/two_moon

test: $(VENV)/.synced
	$(VENV)/bin/python -m pytest -q
