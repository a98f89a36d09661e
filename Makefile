# The two set-up commands of the README. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run toy smoke test test-fast lint bench

$(VENV)/.installed-main: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The tests compile the kernels and the run's programs for TPU and H100 with the real compilers (the
# `compilers` extra: libtpu, jax's CUDA plugin, triton), on this CPU.
$(VENV)/.installed-test: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,compilers]"
	touch $(VENV)/.installed-main $@

# The main job: the built-in task end to end on CPU (data, tokenizer, warm start, eval, AttnRL, eval,
# report in runs/task/report/index.html); run again, it resumes.
run: $(VENV)/.installed-main
	$(PY) train.py --config=configs/task.py

# The same job at toy sizes (about a minute, plus the install): every stage runs, nothing learns.
toy: $(VENV)/.installed-main
	$(PY) train.py --config=configs/task.py:toy

# A quick check of the model alone (init, sharded forward, Hugging Face export and reload).
smoke: $(VENV)/.installed-main
	$(PY) train.py --config=configs/tiny.py

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two test processes (pytest-xdist), each test file kept in one (its module fixtures are built once): on the
# 2-core CI machine the suite takes 19.5 min plus the install (2026-12-07, with the real-compiler tests and the
# fault suite). TEST_WORKERS=0 runs it serially.
# A worker that crashes is not replaced: the run fails at once naming the test (xdist 3.8's loadfile
# scheduling can hang forever after replacing one).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0)

# The unit tests alone (not the integration tests marked `slow`: whole jobs, subprocesses, the real-compiler
# builds, the sampler's end-to-end invariants): 538 tests in 1.5 min on this 2-core machine (2026-12-07,
# e99df13), for the loop of a change; `make test` (and CI) runs everything.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not benchmark and not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0)

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.model_forward
