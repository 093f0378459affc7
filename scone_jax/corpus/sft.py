"""Supervised fine-tuning corpora: the loss on response tokens only (docs/METHOD.md,
"Post-training").

Two JSONL formats (`data.format`), one record per line:
  'sft'   {"prompt": str, "response": str}
  'chat'  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
Each record becomes a `Document` whose `spans` are (text, trained) pieces in order; its
`text` is their concatenation (what tokenizer training, bytes and f-gram mining see).
prepare encodes each span on its own and stores a 0/1 loss mask per token beside the token
shards (tokenizer/shards.py), so the loss covers the trained spans only (batches/packing.py).

Templates:
* 'sft': prompt + "\\n" (not trained), then the response (trained).
* 'chat', PLAIN template (the default): each message as "<|ROLE|>\\n" + content + "\\n";
  an assistant message's content and its closing "\\n" are trained, everything else not.
* 'chat' with the tokenizer's own template: when the run's tokenizer.json has a
  tokenizer_config.json beside it with a "chat_template" (Hugging Face's jinja2 template),
  prepare renders it with jinja2 (`template_spans`); the trained spans are what each
  assistant message adds to the rendering of the conversation before it (rendered with
  add_generation_prompt=True).
Bad records (a missing or non-string field, an unknown role, an empty response, no
assistant message) raise CorpusError naming the file, line and field, during prepare and
so before any training.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Sequence

from scone_jax import paths
from scone_jax.corpus.document import CorpusError, Document, json_lines

SFT_FORMATS = ('sft', 'chat')
ROLES = ('system', 'user', 'assistant', 'tool')
TRAINED_ROLE = 'assistant'
Messages = tuple[tuple[str, str], ...]
Spans = tuple[tuple[str, bool], ...]


def documents(lines: Iterator[tuple[int, str]], path: str, fmt: str,
              template: Callable[[Messages], Spans] | None = None) -> Iterator[Document]:
  """Documents of an 'sft' or 'chat' JSONL file from its decoded (line number, line)s.

  template: renders a conversation to spans (`template_spans` of a chat template);
  None = the plain template.
  """
  hint = f'fix the line (data.format={fmt!r} reads one JSON object per line)'
  for where, record in json_lines(lines, path, hint):
    if not isinstance(record, dict):
      raise CorpusError(f'{where}: a JSON {type(record).__name__}, not an object; '
                        f'data.format={fmt!r} needs one object per line')
    if fmt == 'sft':
      prompt, response = (_string(record, key, where) for key in ('prompt', 'response'))
      if not response.strip():
        raise CorpusError(f'{where}: field "response" is empty: nothing to train on; drop '
                          'the record or fill it')
      spans = ((prompt + '\n', False), (response, True))
    else:
      messages = parse_messages(record, where)
      spans = template(messages) if template is not None else plain_spans(messages)
    yield Document(''.join(text for text, _ in spans), where, spans=spans)


def _string(record: dict, key: str, where: str) -> str:
  value = record.get(key)
  if not isinstance(value, str):
    found = 'missing' if key not in record else f'a {type(value).__name__}'
    raise CorpusError(f'{where}: field "{key}" is {found}; every record needs a string '
                      f'"{key}" (keys found: {sorted(record)})')
  return value


def parse_messages(record: dict, where: str) -> Messages:
  """A chat record's messages as (role, content) pairs; CorpusError on a bad one."""
  messages = record.get('messages')
  if not isinstance(messages, list) or not messages:
    raise CorpusError(f'{where}: field "messages" must be a non-empty list of {{"role", '
                      f'"content"}} objects (keys found: {sorted(record)})')
  out = []
  for i, message in enumerate(messages):
    at = f'{where}: messages[{i}]'
    if not isinstance(message, dict):
      raise CorpusError(f'{at} is a {type(message).__name__}, not a {{"role", "content"}} '
                        'object')
    role, content = (_string(message, key, at) for key in ('role', 'content'))
    if role not in ROLES:
      raise CorpusError(f'{at}: field "role" is {role!r}, not one of {list(ROLES)}')
    if role == TRAINED_ROLE and not content.strip():
      raise CorpusError(f'{at}: field "content" of an assistant message is empty: nothing '
                        'to train on; drop the message or fill it')
    out.append((role, content))
  if not any(role == TRAINED_ROLE for role, _ in out):
    raise CorpusError(f'{where}: no "assistant" message: nothing to train on (the loss '
                      'covers assistant messages only)')
  return tuple(out)


def plain_spans(messages: Messages) -> Spans:
  """The plain template: "<|ROLE|>\\n" + content + "\\n" per message; assistant content and
  its newline trained."""
  spans = []
  for role, content in messages:
    spans.append((f'<|{role}|>\n', False))
    spans.append((content + '\n', role == TRAINED_ROLE))
  return tuple(spans)


def template_spans(render: Callable[[Sequence[dict], bool], str], messages: Messages) -> Spans:
  """Spans of a chat template: `render(messages, add_generation_prompt)` -> text.

  An assistant message's trained span is what its rendering adds to the conversation
  before it rendered with the generation prompt; the rest is not trained. A template
  whose renderings are not prefixes of one another cannot be split this way: CorpusError.
  """
  spans, done = [], ''
  dicts = [{'role': r, 'content': c} for r, c in messages]
  for i, (role, _) in enumerate(messages):
    if role == TRAINED_ROLE:
      before = render(dicts[:i], True)
      if not before.startswith(done):
        raise CorpusError('the chat template renders a conversation that is not a prefix '
                          'of its continuation; the response tokens cannot be masked: use '
                          'a template without history-dependent edits (or none: the plain '
                          'template)')
      spans.append((before[len(done):], False))
      done = before
    through = render(dicts[:i + 1], False)
    if not through.startswith(done):
      raise CorpusError('the chat template renders a conversation that is not a prefix of '
                        'its continuation; the response tokens cannot be masked: use a '
                        'template without history-dependent edits (or none: the plain '
                        'template)')
    spans.append((through[len(done):], role == TRAINED_ROLE))
    done = through
  return tuple((text, trained) for text, trained in spans if text)


def chat_template(tokenizer_file: str) -> str:
  """The "chat_template" of the tokenizer_config.json beside a tokenizer.json ('' = none:
  the plain template). A list of named templates gives its "default"."""
  if not tokenizer_file:
    return ''
  config_path = paths.join(os.path.dirname(tokenizer_file), 'tokenizer_config.json')
  if not paths.exists(config_path):
    return ''
  try:
    template = json.loads(paths.read_text(config_path)).get('chat_template') or ''
  except (ValueError, AttributeError) as e:
    raise CorpusError(f'{config_path}: not a JSON object ({e}); fix or remove it (its '
                      '"chat_template" renders data.format=\'chat\' records)') from e
  if isinstance(template, list):
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default') or ''
  if not isinstance(template, str):
    raise CorpusError(f'{config_path}: "chat_template" is a {type(template).__name__}, not a '
                      'jinja2 string')
  return template


def jinja_renderer(template: str, bos_token: str = '', eos_token: str = ''
                   ) -> Callable[[Sequence[dict], bool], str]:
  """A Hugging Face chat template (tokenizer_config.json "chat_template") as a function,
  rendered with jinja2 in a sandbox as transformers does (trim_blocks, lstrip_blocks).
  bos_token renders as '' by default: packing prepends BOS to every document anyway."""
  # Imported here: jinja2 is needed only for a tokenizer that has a chat template.
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise CorpusError(f'the chat template refused a conversation: {message}')

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals['raise_exception'] = raise_exception
  compiled = env.from_string(template)
  return lambda messages, add_generation_prompt: compiled.render(
      messages=list(messages), add_generation_prompt=add_generation_prompt,
      bos_token=bos_token, eos_token=eos_token)
