"""Supervised fine-tuning (corpus/sft.py): prompt/response and chat JSONL, the loss mask
stored with the token shards, kept by packing and resume, the train loss on response tokens
only, the held-out response loss in eval.json; bad records refused before any training."""

import json
import os

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import batches
from scone_jax import config as config_lib
from scone_jax import prepare as prepare_lib
from scone_jax.config import ConfigError
from scone_jax.fgrams import FgramTable
from scone_jax import run as run_lib
from scone_jax.corpus import CorpusError, Document, FileCorpus, sft
from scone_jax.tokenizer import TokenShards, write_shards
from scone_jax.train import loop

_WORDS = [f'w{i}' for i in range(200)] + 'the of and to in is that for it as'.split()


def _write_sft(path: str, count: int, seed: int) -> None:
  """Records whose response is a fixed function of the prompt (its words reversed, then
  'end'): a model can learn it, and prompt and response tokens differ in role."""
  rng = np.random.default_rng(seed)
  with open(path, 'w') as f:
    for _ in range(count):
      words = list(rng.choice(_WORDS, size=rng.integers(3, 9)))
      f.write(json.dumps({'prompt': 'say back: ' + ' '.join(words),
                          'response': ' '.join(words[::-1]) + ' end'}) + '\n')


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
  """An 8-step baseline SFT run on a prompt/response corpus: (config, W)."""
  base = tmp_path_factory.mktemp('sft')
  _write_sft(str(base / 'train.jsonl'), 600, 0)
  _write_sft(str(base / 'eval.jsonl'), 40, 1)
  cfg = th.micro_config(str(base), **{
      'data.format': 'sft', 'data.train_files': str(base / 'train.jsonl'),
      'data.eval_files': 'heldout=' + str(base / 'eval.jsonl'),
      'fgram_model.num_layers': 0, 'train.steps': 8, 'train.learning_rate': 3e-3,
      'checkpoint.every_steps': 0, 'train.eval_batches': 2})
  workdir = str(base / 'W')
  loop.train(cfg, workdir)
  return cfg, workdir


def test_masks_are_stored_packed_and_resumed(sft_run):
  cfg, workdir = sft_run
  run = run_lib.RunDir(workdir)
  shards = run.train_shards()
  assert shards.manifest['loss_mask'] == 'loss_mask.bin'
  assert 'loss_mask.bin' in json.dumps(shards.manifest)
  tok = run.tokenizer()
  # Document 0's mask: 0 over the encoded prompt + newline, 1 over the response.
  first = next(iter(FileCorpus([cfg.data.train_files], 'sft')))
  (prompt, _), (response, _) = first.spans
  n_prompt, n_response = (tok.encode([t])[0].size for t in (prompt, response))
  np.testing.assert_array_equal(shards.loss_mask[:shards.offsets[1]],
                                [0] * n_prompt + [1] * n_response)
  # Train batches weight each target by its mask: prompt targets 0, response targets 1.
  it = batches.make_train_iterator(cfg, shards, bos_id=tok.bos_id)
  batch = next(it)
  w, t, seg = batch['weights_BxT'], batch['targets_BxT'], batch['segment_ids_BxT']
  assert 0 < w.sum() < (seg > 0).sum()  # Some real targets are prompt tokens, weight 0.
  assert set(np.unique(w[seg > 0])) == {0.0, 1.0}
  assert np.all(w[seg == 0] == 0)
  # Per segment: the weighted targets are response text, the unweighted ones the prompt.
  trained = [tok.decode(t[r][(seg[r] == s) & (w[r] > 0)]) for r in range(t.shape[0])
             for s in range(1, seg[r].max() + 1)]
  untrained = [tok.decode(t[r][(seg[r] == s) & (w[r] == 0)]) for r in range(t.shape[0])
               for s in range(1, seg[r].max() + 1)]
  assert not any('say' in x for x in trained) and sum(x.endswith('end') for x in trained) >= 3
  assert sum('say back:' in x for x in untrained) >= 3
  # Resume: batches after a restored iterator state are bitwise those of one pass.
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = batches.make_train_iterator(cfg, shards, bos_id=tok.bos_id)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_response_loss_falls_and_is_evaluated(sft_run):
  _, workdir = sft_run
  run = run_lib.RunDir(workdir)
  losses = [m['loss'] for m in run.metrics() if 'loss' in m]
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.3  # 6.26 -> 5.69 measured
  with open(os.path.join(workdir, 'eval.json')) as f:
    heldout = json.load(f)['corpora']['heldout']
  for key in ('loss', 'perplexity', 'bits_per_byte', 'response_loss', 'response_tokens'):
    assert np.isfinite(heldout[key])
  assert 0 < heldout['response_tokens'] < heldout['tokens']


def test_shards_without_mask_read_as_all_ones(tmp_path, sft_run):
  tok = run_lib.RunDir(sft_run[1]).tokenizer()
  docs = [Document('say back: w1 w2', 'a:1'), Document('w3 w4 end', 'a:2')]
  shards = write_shards(str(tmp_path / 'plain'), docs, tok, 'fp')
  assert shards.loss_mask is None and 'loss_mask' not in shards.manifest
  masked = write_shards(str(tmp_path / 'masked'), docs, tok, 'fp', loss_mask=True)
  np.testing.assert_array_equal(masked.loss_mask, np.ones(masked.num_tokens, np.uint8))
  assert masked.fingerprint != shards.fingerprint
  assert TokenShards.open(str(tmp_path / 'masked')).loss_mask is not None
  examples = batches.packing.make_examples(shards.offsets, 8)
  rows = batches.packing.build_rows(examples, [np.arange(examples.num_examples)],
                                    shards.tokens, shards.offsets, tok.bos_id, 16)
  assert 'loss_mask_BxT' not in rows


@pytest.mark.parametrize('record,field', [
    ({'prompt': 'a'}, '"response" is missing'),
    ({'prompt': 'a', 'response': '  '}, '"response" is empty'),
    ({'prompt': 3, 'response': 'b'}, '"prompt" is a int'),
])
def test_bad_sft_records(tmp_path, record, field):
  path = tmp_path / 'x.jsonl'
  path.write_text(json.dumps({'prompt': 'ok', 'response': 'fine'}) + '\n' +
                  json.dumps(record) + '\n')
  with pytest.raises(CorpusError, match=f'{path}:2: field {field}'):
    list(FileCorpus([str(path)], 'sft'))


@pytest.mark.parametrize('messages,field', [
    ([{'role': 'wizard', 'content': 'a'}], r'messages\[0\]: field "role" is \'wizard\''),
    ([{'role': 'user'}], r'messages\[0\]: field "content" is missing'),
    ([{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': ''}],
     r'messages\[1\]: field "content" of an assistant message is empty'),
    ([{'role': 'user', 'content': 'a'}], 'no "assistant" message'),
])
def test_bad_chat_records(tmp_path, messages, field):
  path = tmp_path / 'c.jsonl'
  path.write_text(json.dumps({'messages': messages}) + '\n')
  with pytest.raises(CorpusError, match=f'{path}:1: {field}'):
    list(FileCorpus([str(path)], 'chat'))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_spans(tmp_path):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'},
              {'role': 'assistant', 'content': 'Bye.'}]
  path = tmp_path / 'c.jsonl'
  path.write_text(json.dumps({'messages': messages}) + '\n')
  plain = next(iter(FileCorpus([str(path)], 'chat')))
  assert [t for t, trained in plain.spans if trained] == ['Hello.\n', 'Bye.\n']
  assert plain.text.startswith('<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': CHATML}))
  template = sft.chat_template(str(tmp_path / 'tokenizer.json'))
  doc = next(iter(FileCorpus([str(path)], 'chat', chat_template=template)))
  assert [t for t, trained in doc.spans if trained] == ['Hello.<|im_end|>\n', 'Bye.<|im_end|>\n']
  render = sft.jinja_renderer(CHATML)
  assert doc.text == render(messages, False)
  assert ''.join(t for t, _ in doc.spans[:3]) == render(messages[:2], True)


def test_given_fgram_table(sft_run, tmp_path):
  """fgram.table_dir: prepare takes a given table (here the SFT run's own, with its
  tokenizer) instead of mining; a table of another K is refused naming the key."""
  cfg, workdir = sft_run
  run = run_lib.RunDir(workdir)
  given = os.path.join(os.path.dirname(os.path.dirname(run.tokenizer().path)), 'fgrams')
  values = th.micro_dict(str(tmp_path), **{
      'data.format': 'sft', 'data.train_files': cfg.data.train_files,
      'data.eval_files': cfg.data.eval_files, 'fgram.table_dir': given,
      'tokenizer.model_file': run.tokenizer().path, 'fgram.allow_short_table': True})
  prepared = prepare_lib.prepare(config_lib.from_configdict(values), str(tmp_path / 'W'))
  source = FgramTable.load(given)
  assert len(prepared.table) == len(source) > 0
  np.testing.assert_array_equal(prepared.table.tokens_SxK, source.tokens_SxK)
  assert prepared.table.meta['given'] == given
  values['fgram']['max_len'] = source.max_len + 1
  with pytest.raises(ConfigError, match=f'set config.fgram.max_len={source.max_len}'):
    prepare_lib.prepare(config_lib.from_configdict(values), str(tmp_path / 'W2'))


# A Qwen-style template: a default system message, whitespace control, loop variables.
QWEN_LIKE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.'"
    " + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + "
    "'<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")


@pytest.mark.parametrize('template', [CHATML, QWEN_LIKE], ids=['chatml', 'qwen_like'])
def test_chat_template_renders_as_transformers(template):
  """Our jinja2 rendering equals transformers' apply_chat_template (a test-only package)."""
  transformers = pytest.importorskip('transformers')
  tokenizers = pytest.importorskip('tokenizers')
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({'[UNK]': 0}, '[UNK]')),
      chat_template=template)
  messages = [{'role': 'user', 'content': ' Hi there '}, {'role': 'assistant', 'content': 'Hello.'},
              {'role': 'user', 'content': 'Bye'}]
  render = sft.jinja_renderer(template)
  for n, prompt in ((1, True), (2, False), (3, True)):
    assert render(messages[:n], prompt) == tok.apply_chat_template(
        messages[:n], tokenize=False, add_generation_prompt=prompt)
