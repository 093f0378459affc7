# The two commands: `make demo` (the main job on the embedded corpus) and `make test`;
# `make study` is the evidence run behind the README's claims (tuned lrs, 3 seeds, intervals);
# `make compare` runs the beyond-the-paper arms (add, gate, table, hashed) the same way.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= runs/demo
STUDY_ROOT ?= runs
PYTEST_ARGS ?=

.PHONY: demo study compare test test-all bench venv clean slurm-packages

# (Re)install only when a requirements file changed.
$(STAMP): requirements.txt requirements-dev.txt requirements-beam.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-beam.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scone_jax.demo --workdir=$(DEMO_WORKDIR)

study: $(STAMP)
	$(PY) -m scone_jax.sweeps --sweep=experiments/sweeps/study.py --root=$(STUDY_ROOT) \
	    --parallel=2 --report

compare: $(STAMP)
	$(PY) -m scone_jax.sweeps --sweep=experiments/sweeps/compare.py --root=$(STUDY_ROOT) \
	    --parallel=2 --report

# The SLURM tests start a real single-node SLURM: install its packages when root + apt
# allow (a no-op once installed); otherwise those tests skip and say why.
slurm-packages:
	@.ci/install-slurm.sh

test: $(STAMP) slurm-packages
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) slurm-packages
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
