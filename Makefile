# Two commands do all set-up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Both create .venv from uv.lock first (uv itself is installed with pip if missing).
PYTHON ?= python3
VENV := .venv
# PyTorch's huge-page allocator: without it, re-faulting freed activation buffers costs about half of a
# CPU training step at large batch on this machine.
export THP_MEM_ALLOC_ENABLE := 1
# DeepSpeed's CPU op build goes into this checkout's venv, not the ~/.cache directory every checkout shares
# (concurrent builds there clash; a killed one leaves a lock that hangs later runs). mpl_large.zero sets the
# same default for launches outside make.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test

$(VENV)/.synced: pyproject.toml uv.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv sync --frozen --compile-bytecode
	touch $@

# The EfficientNet-L2 recipe's whole path on 2 CPU ranks; each rank one thread that sleeps, not spins,
# while it waits for the other.
demo: $(VENV)/.synced
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 \
		--num_machines 1 --mixed_precision no --dynamo_backend no recipes/efficientnet_l2_jft.py --preset demo

test: $(VENV)/.synced
	$(VENV)/bin/python -m pytest -q
