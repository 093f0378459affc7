"""Quiet logs: third-party INFO chatter stays out of a run's log unless asked.

On a CPU machine orbax's per-save INFO lines (tens per checkpoint) and jax's "Unable to
initialize backend 'tpu'" line were most of a training log. `quiet_third_party_logs`
drops INFO (and DEBUG) records of those libraries; their warnings and errors, and every
record of scone_jax, pass. `--verbosity=1` (absl's flag, also `-v 1`) keeps everything.

It also drops asyncio's "Event loop is closed" errors: after a failed write to a bucket the
storage client's connections are closed by the garbage collector once the event loop they
ran on is gone, which logs (or reports as an unraisable exception) a traceback per
connection below the one line that says what failed.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

# Libraries that log through absl (one 'absl' logger), recognised by their source path.
_QUIET_PATHS = tuple(os.sep + p + os.sep for p in ('orbax', 'grain'))
# Libraries that log through their own Python loggers.
_QUIET_LOGGERS = ('jax._src.xla_bridge', 'orbax', 'grain', 'gcsfs')


class ThirdPartyInfoFilter(logging.Filter):
  """Passes WARNING and above from everyone, INFO and below only from non-quiet sources."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name.startswith('asyncio') and _is_closed_loop_noise(
        record.getMessage(), record.exc_info[1] if record.exc_info else None):
      return False
    if record.levelno >= logging.WARNING:
      return True
    if record.name.startswith(_QUIET_LOGGERS):
      return False
    return not any(p in record.pathname for p in _QUIET_PATHS)


_CLOSED_LOOP = 'Event loop is closed'


def _is_closed_loop_noise(message: str, exc: BaseException | None) -> bool:
  return _CLOSED_LOOP in message or (isinstance(exc, RuntimeError) and
                                     _CLOSED_LOOP in str(exc))


def _quiet_unraisable(unraisable, default=sys.unraisablehook) -> None:
  """sys.unraisablehook without the closed-event-loop reports of collected connections."""
  if not _is_closed_loop_noise('', unraisable.exc_value):
    default(unraisable)


_FILTER = ThirdPartyInfoFilter()


def quiet_third_party_logs() -> None:
  """Installs the filter on absl's handler unless `--verbosity` >= 1 was asked for.

  Call from an entry point's main (after absl parsed the flags).
  """
  verbosity = flags.FLAGS['verbosity'].value if 'verbosity' in flags.FLAGS else 0
  handler = absl_logging.get_absl_handler()
  if verbosity >= 1:
    handler.removeFilter(_FILTER)
    sys.unraisablehook = sys.__unraisablehook__
  else:
    handler.addFilter(_FILTER)
    sys.unraisablehook = _quiet_unraisable
