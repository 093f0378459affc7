"""The prepared inputs a run reads: tokenizer, train/eval token shards, f-gram table."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax

from scone_jax import prepare as prepare_lib
from scone_jax.config import Config


@dataclasses.dataclass
class TrainInputs:
  tokenizer: Any  # scone_jax.tokenizer.Tokenizer
  train_shards: Any  # TokenShards
  eval_shards: dict[str, Any]  # corpus name -> TokenShards
  table: Any | None  # FgramTable (None for the baseline)
  table_dir: str | None = None  # Where the table is (recorded in W/run.json).

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def open_train_inputs(cfg: Config, workdir: str, build_missing: bool = True) -> TrainInputs:
  """Opens the run's artifacts, preparing them first when missing and `build_missing`.

  With several processes only process 0 prepares (the artifact directory must be on a
  shared filesystem); the others wait at a barrier and then open what it wrote.
  """
  if build_missing and jax.process_index() == 0:
    prepared = prepare_lib.prepare(cfg, workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('scone_jax.prepare')
  if not build_missing or jax.process_index() != 0:
    prepared = prepare_lib.load_prepared(cfg, workdir)
  logging.info('run data: %s', prepared)
  return TrainInputs(tokenizer=prepared.tokenizer, train_shards=prepared.train_shards,
                 eval_shards=dict(prepared.eval_shards),
                 table=prepared.table if cfg.fgram_model.uses_fgram_table else None,
                 table_dir=prepared.fgram_dir if cfg.fgram_model.uses_fgram_table else None)
