"""Shared by the train / resume / multihost / evaluate tests: a micro corpus and config.

The corpus is synthetic, seeded text: documents built from a small set of repeated phrases
(so frequent f-grams exist) mixed with rarer words. Prepare on it takes well under a
second; the model is 1 layer, d=32, so the train step compiles in seconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from typing import Any

import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax import config as config_lib


def write_corpus(directory: str, num_train_docs: int = 1500, seed: int = 0) -> None:
  """Writes train.txt and eval.txt (one document per line) if not already there."""
  if os.path.exists(os.path.join(directory, 'eval.txt')):
    return
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  common = ('the of and to in is that for it as with was on be by at this from or an are '
            'have not which but all were one can had there their').split()
  rare = [f'w{i}' for i in range(300)]
  phrases = [' '.join(rng.choice(common + rare[:50], size=rng.integers(2, 5)))
             for _ in range(40)]

  def doc() -> str:
    return ' '.join(phrases[rng.integers(len(phrases))] if rng.random() < 0.5
                    else str(rng.choice(rare)) for _ in range(rng.integers(5, 40)))
  for name, count in (('train.txt', num_train_docs), ('eval.txt', 100)):
    tmp = os.path.join(directory, name + '.tmp')
    with open(tmp, 'w') as f:
      f.write('\n'.join(doc() for _ in range(count)) + '\n')
    os.replace(tmp, os.path.join(directory, name))


def micro_dict(corpus_dir: str, artifacts_dir: str = '', **overrides: Any) -> dict:
  """The micro run as a plain nested dict (dotted-key overrides applied)."""
  cd = config_lib.base_config()
  cd.name = 'micro'
  cd.data.source = 'files'
  cd.data.train_files = os.path.join(corpus_dir, 'train.txt')
  cd.data.eval_files = 'heldout=' + os.path.join(corpus_dir, 'eval.txt')
  cd.data.artifacts_dir = artifacts_dir
  cd.tokenizer.vocab_size = 512
  cd.fgram.size = 2000
  cd.fgram.min_count = 3
  cd.model.num_layers = 1
  cd.model.d_model = 32
  cd.model.num_heads = 2
  cd.model.max_seq_len = 32
  cd.fgram_model.num_layers = 1
  cd.train.steps = 4
  cd.train.batch_size = 8
  cd.train.seq_len = 32
  cd.train.warmup_steps = 2
  cd.train.log_every = 1
  cd.train.eval_batches = 2
  cd.train.data_prefetch = 0
  cd.checkpoint.every_steps = 2
  cd.checkpoint.keep = 5
  values = cd.to_dict()
  for dotted, value in overrides.items():
    node = values
    *parents, leaf = dotted.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(dotted)
    node[leaf] = value
  return values


def micro_config(corpus_dir: str, artifacts_dir: str = '', **overrides: Any):
  return config_lib.from_configdict(micro_dict(corpus_dir, artifacts_dir, **overrides))


def micro_config_file(path: str, corpus_dir: str, artifacts_dir: str = '',
                      **overrides: Any) -> str:
  """Writes an experiment file (for the CLIs) returning the micro config; returns path."""
  values = micro_dict(corpus_dir, artifacts_dir, **overrides)
  with open(path, 'w') as f:
    f.write('import ml_collections\n\n\ndef get_config():\n'
            f'  return ml_collections.ConfigDict({values!r})\n')
  return path


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS with `num_devices` fake CPU devices, keeping the caller's other flags (e.g.
  `--xla_cpu_max_isa=AVX2`, with which the suite must pass too)."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={num_devices}'])


def subprocess_env(num_devices: int) -> dict[str, str]:
  """Environment for a CLI subprocess: CPU with `num_devices` fake devices, repo on path."""
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = xla_flags(num_devices)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
  return env


def shared_dirs(base_dir: str) -> tuple[str, str]:
  """(corpus dir, prepared artifacts dir) under a session's base temp dir, built once."""
  corpus = os.path.join(base_dir, 'micro_corpus')
  write_corpus(corpus)
  return corpus, os.path.join(base_dir, 'micro_artifacts')


def reference_run(base_dir: str):
  """An uninterrupted micro run (4 steps, checkpoints at 2 and 4), trained once per session
  and shared by the test files; returns (config, workdir)."""
  from scone_jax.train import loop  # Imported here: JAX must see conftest's flags first.
  corpus, artifacts = shared_dirs(base_dir)
  cfg = micro_config(corpus, artifacts)
  workdir = os.path.join(base_dir, 'micro_reference_run')
  if not os.path.exists(os.path.join(workdir, 'eval.json')):
    loop.train(cfg, workdir)
  return cfg, workdir


def checkpoint_arrays(workdir: str, step: int) -> dict[str, np.ndarray]:
  """The saved TrainState of `step` as {path: numpy array}, read without a target."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  tree = ocp.StandardCheckpointer().restore(path)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(autouse=True, scope='module')
def compile_cache(tmp_path_factory):
  """Imported by each train test module so the cache is on before its first compile."""
  enable_compile_cache(str(tmp_path_factory.getbasetemp()))


def enable_compile_cache(base_dir: str) -> None:
  """A persistent XLA cache for this session: the train step of a resumed run (or of the
  same micro config in another test file) compiles once instead of once per train()."""
  import jax
  jax.config.update('jax_compilation_cache_dir', os.path.join(base_dir, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def tree_digest(*roots: str) -> dict[str, str]:
  """{path: sha256} of every file under the roots, except the checksum caches
  (artifacts.VERIFIED: a read records which files it verified, not an artifact): what
  "nothing was written" compares."""
  out = {}
  for root in roots:
    for base, _, names in os.walk(root):
      for name in names:
        if name == artifacts.VERIFIED:
          continue
        path = os.path.join(base, name)
        with open(path, 'rb') as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Waits for every process (killing one still running after `timeout` s), asserts each
  exited 0 (showing the end of its stderr) and returns their stderr texts."""
  errors = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    errors.append(err)
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  return errors
