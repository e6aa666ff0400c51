# One command to set up and run the demo, one to run the tests. Both create .venv when it is missing.
#   make demo        synthetic data -> shards -> fine-tune on 2 CPU processes (or all GPUs) -> results
#   make test        the whole test suite (multi-process DDP, faults, a real local Slurm cluster when root)
#   make test-fast   the fast tier: in-process tests only (pytest -m "not slow"), under 3 min on 2 cores
#   make test-floor  the smoke tests (pytest -m floor) in .venv-floor, at the lowest versions requirements allow
# docs/install.md: what each installs, the optional extras, the floor environment.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FLOOR  := .venv-floor

.PHONY: demo test test-fast test-floor venv venv-test clean

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# The default set only (requirements.txt = pyproject.toml's dependencies). Re-installs when it changes.
# torch/torchvision are capped at the releases this project is tested with; pip takes them from the local
# wheel cache when present.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# ...plus the test tools and the optional extras the tests exercise.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# The floor environment: every lower bound pinned (requirements-floor.txt). torch 2.11.0 comes from PyPI as
# CUDA wheels (~4 GB with the nvidia libraries, minutes the first time); pip's cache keeps them for later runs.
$(FLOOR)/.installed: requirements-floor.txt
	test -x $(FLOOR)/bin/python || $(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q -r requirements-floor.txt
	touch $@

demo: venv
	PYTHON=$(PY) bash launch/demo.sh

test: venv-test
	@# The Slurm tests need slurmctld/slurmd/munge (root + apt); without them they skip with a reason.
	-@bash .ci/install-slurm.sh >/dev/null 2>&1 || echo "make test: could not install Slurm; its tests will skip"
	$(PY) -m pytest -q --durations=15

# Every test not marked slow: no subprocess, no Slurm, no multi-process DDP (tests/conftest.py fails a test that
# starts a process without the slow marker). For the edit-test loop; `make test` remains the full check.
test-fast: venv-test
	$(PY) -m pytest -q -m "not slow" --durations=10

# FLOOR_ENV=1: tests/project/test_requirements.py then checks that every installed version is exactly its floor pin.
test-floor: $(FLOOR)/.installed
	FLOOR_ENV=1 $(FLOOR)/bin/python -m pytest -q -m floor --durations=10

clean:
	rm -rf runs data
