"""experiments/sweeps/post_training.py at CPU scale: SFT of a tiny pretrained run, with and
without SCONE attached (A_f of its own, larger width from another tiny run).

The "pretrained checkpoints" are our own micro runs, made first (minutes on a laptop CPU):
  python -m scone_jax.train --config=experiments/demo.py:micro \\
      --workdir=runs/post_training_micro/base --config.fgram_model.num_layers=0 \\
      --config.train.steps=300
  python -m scone_jax.train --config=experiments/demo.py:micro \\
      --workdir=runs/post_training_micro/af64 --config.fgram_model.num_layers=0 \\
      --config.model.d_model=64 --config.train.steps=300 \\
      --config.data.artifacts_dir=runs/post_training_micro/base/prepare
then the sweep, on a prompt/response JSONL of your own ({"prompt": ..., "response": ...}
per line; data.format='chat' for {"messages": [...]}), tokenized with the base run's
tokenizer so its embedding rows keep their meaning:
  python -m scone_jax.sweeps --sweep=experiments/sweeps/post_training_micro.py --root=runs \\
      --set=data.train_files=/d/sft_train.jsonl --set=data.eval_files=heldout=/d/sft_eval.jsonl
Points: the SFT baseline (the base run fine-tuned) and SCONE attached to it (combine='add',
zero-initialised projection: step 0 is the base run exactly; A_f = the width-64 run's first
layer). eval.json's `response_loss` is the held-out loss on response tokens.
"""

BASE_CONFIG = 'experiments/demo.py:micro'
BASE_RUN = 'runs/post_training_micro/base'
AF_RUN = 'runs/post_training_micro/af64'


def get_sweep():
  sft = {'data.source': 'files', 'data.format': 'sft', 'train.init_from_run': BASE_RUN,
         'tokenizer.model_file': BASE_RUN + '/prepare/tokenizer/spm.model',
         'train.steps': 100, 'train.learning_rate': 1e-3, 'fgram.allow_short_table': True}
  return [{**sft, 'fgram_model.num_layers': 0},
          {**sft, 'fgram_model.num_layers': 1, 'fgram_model.d_model': 64,
           'fgram_model.combine': 'add', 'fgram_model.zero_init_out': True,
           'fgram_model.init_from_run': AF_RUN}]
