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

.PHONY: demo study compare test test-all bench venv clean gpu-wheels slurm-packages \
    prose-corpora study-prose gpu-corpus

# (Re)install only when a requirements file changed.
$(STAMP): requirements.txt requirements-dev.txt requirements-beam.txt requirements-torch.txt \
    pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-beam.txt
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scone_jax.demo --workdir=$(DEMO_WORKDIR)

study: $(STAMP)
	$(PY) -m scone_jax.sweeps --sweep=experiments/sweeps/study.py --root=$(STUDY_ROOT) \
	    --parallel=2 --report

# The same study, unchanged, on natural-language corpora (scone_jax/corpus/prose.py: the
# King James Bible and the fortunes collection, from Debian packages; STUDY.md reports
# each corpus separately). One sweep dir per corpus: $(STUDY_ROOT)/prose_<corpus>/study.
PROSE_DIR ?= data/prose
PROSE_CORPORA ?= kjv fortunes
prose-corpora: $(STAMP)
	@set -e; for c in $(PROSE_CORPORA); do test -f $(PROSE_DIR)/$$c/test.txt || { \
	  .ci/install-prose.sh && $(PY) -m scone_jax.corpus.prose --out=$(PROSE_DIR) \
	    --corpora=$$c; }; done

study-prose: prose-corpora
	set -e; for c in $(PROSE_CORPORA); do d=$(abspath $(PROSE_DIR))/$$c; \
	  $(PY) -m scone_jax.sweeps --sweep=experiments/sweeps/study.py \
	    --root=$(STUDY_ROOT)/prose_$$c --parallel=2 --report --set=data.source=files \
	    --set=data.format=lines --set=data.train_files=$$d/train.txt \
	    --set=data.valid_files=$$c=$$d/valid.txt --set=data.eval_files=$$c=$$d/test.txt; \
	done

# The corpus benchmarks/gpu_study.py trains on, compressed into the carried .whl/ folder.
gpu-corpus: prose-corpora
	mkdir -p .whl/corpus
	tar -C $(PROSE_DIR) -cJf .whl/corpus/kjv.tar.xz.tmp kjv && \
	  mv .whl/corpus/kjv.tar.xz.tmp .whl/corpus/kjv.tar.xz

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
