# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUFF := $(VENV)/bin/ruff
TEST_WORKERS ?= 2

.PHONY: demo test lint bench clean dist-check compat

$(STAMP): pyproject.toml setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e ".[all,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fused-ft demo

# worksteal: an idle worker takes queued tests from the busy one, so the run does not end on one core
# working through a file of long tests; --durations keeps the slowest in CI's log (the bar: 12 min on 2 cores)
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=25 tests

# The sdist and wheel, installed with default pip settings into a fresh venv that has torch; smoke test
# with a just-in-time build of the C++ extension (minutes: the compile). tests/test_install.py is the
# suite's cheaper version.
dist-check: $(STAMP)
	PY=$(PY) PYTHON=$(PYTHON) tests/dist_check.sh

# The core suite under the oldest torch that pyproject.toml declares and the newest on PyPI: one venv each
# under .compat/<version>/, installed from PyPI past this machine's pip caps (several GB each, hours
# on 2 cores), then the Triton-interpreter tests under torch 2.6 (the triton backend's floor, Triton 3.2).
# Too slow for CI: run by hand, recorded in COMPAT.md. Versions: make compat COMPAT_TORCH="2.5.0 2.15.0"
compat:
	$(PYTHON) tests/compat.py $(COMPAT_TORCH); suite=$$?; $(PYTHON) tests/compat.py --triton-floor; floor=$$?; \
	$(PYTHON) tests/compat.py --table; test $$suite -eq 0 && test $$floor -eq 0

# lint needs only ruff (the pinned one): not torch, the extras and a C++ build of the extension, which
# made `make lint` in a fresh clone take as long as the whole install (and a time limit killed it)
$(RUFF): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep -o '^ruff==[^ ]*' requirements-dev.txt)"
	touch $(RUFF)

lint: $(RUFF)
	$(RUFF) check .

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -p no:xdist
	$(PY) -m benchmarks.compare --rounds 12
	$(PY) -m benchmarks.bf16_rounding --rounds 12
	$(PY) -m benchmarks.host_overhead
	$(PY) -m benchmarks.step_in_backward
	$(PY) -m benchmarks.triton_report

clean:
	rm -rf $(VENV) build *.egg-info
