# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when absent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test demo demo-flow install example-plugin bench

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch pinned: this pair is served locally; an unpinned torch pulls a multi-GB build.
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# pyiqa's MUSIQ for the imaging_quality tests. --no-deps: MUSIQ needs two of its many dependencies,
# and `pip install -e .[musiq]` (the users' way) would pull all of them.
TEST_EXTRAS := $(VENV)/.test-extras
$(TEST_EXTRAS): $(STAMP)
	$(PIP) install --quiet --no-deps pyiqa==0.1.16 addict einops
	touch $(TEST_EXTRAS)

# One worker per core (at most 8), each test file on one worker (its module fixtures run once), one torch
# thread per worker (tests/conftest.py).
test: $(STAMP) $(TEST_EXTRAS)
	$(PY) -m pytest -q -rs -p no:cacheprovider -n auto --maxprocesses 8 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/videotuna demo --out demo_out

# The same loop as Flow-DPO on the flow-matching toy (backend toy_flow), self-checking the same way.
demo-flow: $(STAMP)
	$(VENV)/bin/videotuna demo --flow --out demo_flow_out

example-plugin: $(STAMP)
	$(PIP) install --quiet --no-build-isolation -e hooks/example_scorer

# Every benchmarks/bench_*.py; their JSON collected in benchmarks/results.json (and printed).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py
