# One command to set up and run the demo, one to run the tests. Both create .venv when it is missing.
#   make demo    synthetic data -> shards -> fine-tune on 2 CPU processes (or all GPUs) -> results
#   make test    the whole test suite (multi-process DDP, faults, a real local Slurm cluster when root)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test venv clean

venv: $(VENV)/.installed

# Re-installs when requirements.txt changes. torch/torchvision are capped at the releases this
# project is tested with (requirements.txt); pip takes them from the local wheel cache when present.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: venv
	PYTHON=$(PY) bash launch/demo.sh

test: venv
	@# The Slurm tests need slurmctld/slurmd/munge (root + apt); without them they skip with a reason.
	-@bash .ci/install-slurm.sh >/dev/null 2>&1 || echo "make test: could not install Slurm; its tests will skip"
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf runs data
