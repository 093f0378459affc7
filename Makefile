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

.PHONY: demo study compare test test-all bench venv clean gpu-wheels slurm-packages

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

# The wheels benchmarks/accelerator.py installs on the GPU image (Python 3.12, no network):
# what requirements.txt needs and that image lacks (grain 0.2.18's own dependencies
# included). Run where PyPI is reachable; .whl/ is git-ignored and carried to the device.
GPU_WHEELS := grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 cloudpickle==3.1.3 \
    ml-collections==1.1.0 tensorboardX==2.6.5 google-crc32c==1.9.0 tqdm==4.70.1
gpu-wheels:
	rm -rf .whl/site
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 \
	    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
