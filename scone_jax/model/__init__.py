"""The model stage: backbone (gpt2 | olmo), A_f, SCONE embedding layer, sharding, FLOPs."""

from scone_jax.model.backbone import Backbone, Embed, KVCache
from scone_jax.model.fgram_model import FgramModel
from scone_jax.model.flops import FlopsPerToken, ParamCounts, flops_per_token, param_counts
from scone_jax.model.scone import SconeLM
from scone_jax.model.sharding import (LOGICAL_AXIS_RULES, constrain, create_sharded,
                                      logical_to_spec, model_shardings)

__all__ = [
    'Backbone', 'Embed', 'KVCache', 'FgramModel', 'SconeLM', 'LOGICAL_AXIS_RULES',
    'FlopsPerToken', 'ParamCounts', 'flops_per_token', 'param_counts',
    'constrain', 'create_sharded', 'logical_to_spec', 'model_shardings',
]
