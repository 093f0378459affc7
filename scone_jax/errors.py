"""The one base class of user mistakes: what an entry point reports as one line, exit 2.

Every error whose cause is the user's input (a config value, a path, a corpus, a run
directory, a held lock, a corrupt or mismatched artifact, a sweep file) derives from
`UserError` as well as from the builtin it always was (ValueError, RuntimeError, ...), so
existing `except ValueError` callers keep working. The message names the input and the fix.
Anything else reaching an entry point is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the user's input or environment; the message names it and the fix."""
