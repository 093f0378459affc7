"""Presets: how a task's documents become scoring requests, and which metric is the headline.

Two presets (docs/DOWNSTREAM.md states their definitions and where they differ):
  olmo   OLMo's in-loop zero-shot cloze formulation: "Question: {q}\\nAnswer:" (HellaSwag
         and the embedded task: the context as is), each continuation " " + choice; the
         per-task metric OLMo reports (acc for ARC-Easy, length-normalised acc elsewhere).
  olmes  OLMES-style 5-shot cloze: five solved examples from the task's local dev split
         (the first five in file order, never the scored document itself), joined by a
         blank line, before the same template; PMI for ARC-Challenge and CommonsenseQA,
         per-character normalisation elsewhere (OLMES's choices for these tasks).

The embedded task (embedded.py) is headlined by PMI in both presets: its wrong choices are
real sentences of other docstrings, so a choice's own prior probability (its length, its
common words) says nothing about the answer, and PMI divides it out.

A request is (context, continuation); a document gives one per choice plus, for PMI, one
per choice under the unconditional context ("Answer:" for question tasks, empty for
completion tasks), unless the document gives its own `unconditional_context`.
"""

from __future__ import annotations

import dataclasses

from scone_jax.downstream.tasks import Doc, TaskFileError

# The tasks a preset knows: their template and headline metric per preset.
QA, COMPLETION = 'qa', 'completion'
TEMPLATES = {'piqa': QA, 'hellaswag': COMPLETION, 'arc_easy': QA, 'arc_challenge': QA,
             'commonsense_qa': QA, 'mmlu': QA, 'embedded': COMPLETION}
TASKS = tuple(TEMPLATES)
DELIMITER = ' '  # Between context and choice (the continuation is DELIMITER + choice).
SHOT_SEPARATOR = '\n\n'
QA_UNCONDITIONAL = 'Answer:'


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  num_shots: int
  metrics: dict[str, str]  # task -> headline metric (metrics.VARIANTS).


PRESETS = {
    'olmo': Preset('olmo', 0, {
        'piqa': 'acc_per_char', 'hellaswag': 'acc_per_char', 'arc_easy': 'acc_raw',
        'arc_challenge': 'acc_per_char', 'commonsense_qa': 'acc_per_char',
        'mmlu': 'acc_per_char', 'embedded': 'acc_pmi'}),
    'olmes': Preset('olmes', 5, {
        'piqa': 'acc_per_char', 'hellaswag': 'acc_per_char', 'arc_easy': 'acc_per_char',
        'arc_challenge': 'acc_pmi', 'commonsense_qa': 'acc_pmi', 'mmlu': 'acc_per_char',
        'embedded': 'acc_pmi'}),
}


@dataclasses.dataclass(frozen=True)
class Request:
  """What the model scores for one document: log p(DELIMITER + choice | context) for each
  choice, and log p(DELIMITER + choice | unconditional) for PMI."""
  doc: Doc
  context: str
  unconditional: str
  continuations: tuple[str, ...]


def get(preset: str) -> Preset:
  if preset not in PRESETS:
    raise TaskFileError(f'unknown preset {preset!r}; use one of {sorted(PRESETS)}')
  return PRESETS[preset]


def check_task(task: str) -> None:
  if task not in TEMPLATES:
    raise TaskFileError(f'unknown task {task!r}; use one of {list(TASKS)} (convert its '
                        'dataset with python -m scone_jax.downstream.convert)')


def headline(preset: str, task: str) -> str:
  check_task(task)
  return get(preset).metrics[task]


def _format(task: str, context: str) -> str:
  return f'Question: {context}\nAnswer:' if TEMPLATES[task] == QA else context


def _shots_prefix(task: str, doc: Doc, dev: list[Doc], k: int) -> str:
  shots = [d for d in dev if d.id != doc.id][:k]
  return ''.join(_format(task, d.context) + DELIMITER + d.choices[d.gold] + SHOT_SEPARATOR
                 for d in shots)


def requests(preset: str, task: str, docs: list[Doc],
             dev: list[Doc] | None = None) -> list[Request]:
  """The preset's requests for `docs`; `dev` holds the few-shot examples (olmes)."""
  p = get(preset)
  check_task(task)
  if p.num_shots and (dev is None or len(dev) < p.num_shots + 1):
    raise TaskFileError(f'preset {preset!r} takes {p.num_shots} examples from the task\'s '
                        f'dev split; give a dev task file with >= {p.num_shots + 1} '
                        f'documents (have {0 if dev is None else len(dev)})')
  default_uncond = QA_UNCONDITIONAL if TEMPLATES[task] == QA else ''
  out = []
  for doc in docs:
    prefix = _shots_prefix(task, doc, dev, p.num_shots) if p.num_shots else ''
    uncond = (doc.unconditional_context if doc.unconditional_context is not None
              else default_uncond)
    out.append(Request(doc, prefix + _format(task, doc.context), uncond,
                       tuple(DELIMITER + c for c in doc.choices)))
  return out
