"""The controlled experiment of STUDY.md "Beyond one corpus": the study's baseline and its
S = 2048 arm (1-layer A_f) on the SAME text at a larger tokenizer vocabulary.

Hypothesis under test: SCONE's gain at this scale grows with the share of positions whose
longest f-gram match is a multi-word phrase. A larger vocabulary absorbs sub-word f-grams
into single tokens, so at 8,192 pieces the matched positions are mostly cross-word ones;
the text, the model, the lr grid, the tuning seeds and the comparison seeds are the
study's (experiments/sweeps/study.py, read from that file, so the two cannot drift).
Compare its paired SCONE-minus-baseline difference with the study's at 2,048 pieces on the
same corpus (per token AND per byte: the token counts differ between vocabularies).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/study_vocab.py \\
      --root=runs/prose_kjv --parallel=2 --report --set=data.source=files \\
      --set=data.format=lines --set=data.train_files=$PWD/data/prose/kjv/train.txt \\
      --set=data.valid_files=kjv=$PWD/data/prose/kjv/valid.txt \\
      --set=data.eval_files=kjv=$PWD/data/prose/kjv/test.txt
"""

import os

from scone_jax.sweeps import spec

_STUDY = spec.load_sweep_module(os.path.join(os.path.dirname(__file__), 'study.py'))
BASE_CONFIG = _STUDY.BASE_CONFIG
VOCAB_SIZE = 8192


def get_study():
  study = _STUDY.get_study()
  s = f'S={_STUDY.NUM_FGRAMS[-1]}'
  arms = {a: {**study['arms'][a], 'tokenizer.vocab_size': VOCAB_SIZE}
          for a in (study['baseline'], s)}
  return {**study, 'arms': arms}
