"""What every `python -m scone_jax.*` entry point shares: its flags and how it fails.

An entry point defines its flags at module level into its own `flags.FlagValues` (so that
importing it as a library, as train imports prepare and evaluate, defines nothing global)
with the helpers here, and ends with `cli.run('<entry>', main, FLAGS)`:

  FLAGS = flags.FlagValues()
  _WORKDIR = cli.define_workdir(FLAGS)
  _CONFIG = cli.define_config_overrides(FLAGS)
  ...
  if __name__ == '__main__':
    cli.run('export', main, FLAGS)

`run` turns a user's mistake into ONE line `<entry>: <message>` on stderr and exit status
2, with no traceback: a `scone_jax.errors.UserError` (config, corpus, artifact, run, lock,
sweep errors), a bad command line (unknown flag, bad value, a config file that is missing
or does not parse), and the OS errors that are the user's input or environment (a missing
path, a file where a directory must be, a read-only or full disk). `--verbosity=1` (or
`SCONE_TRACEBACK=1` in the environment) shows the traceback too. Anything else is a bug:
its traceback is printed and the status is 1.

Relative config files (`--config=experiments/tiny.py`) and sweep files are looked up in the
current directory first, then in the repository root, so the commands in the docs work
from any directory of a source checkout.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from scone_jax import config as config_lib
from scone_jax import logs, paths
from scone_jax.errors import UserError

# The exit status of a user's mistake (absl's own usage errors use 1; 2 is the shell's
# convention for "bad usage" and tells a launcher not to retry).
USER_ERROR_STATUS = 2
TRACEBACK_ENV = 'SCONE_TRACEBACK'
# How long the first access to a gs:// location may take before we call it unreachable
# (without credentials the storage clients retry for minutes); the environment variable
# raises it for a slow network.
REMOTE_PREFLIGHT_ENV = 'SCONE_REMOTE_PREFLIGHT_SECONDS'
REMOTE_PREFLIGHT_SECONDS = 5.0


class CommandLineError(UserError, ValueError):
  """A flag's value is wrong: a missing file, an unknown key, a malformed value."""


# ---------------------------------------------------------------------------- locations


def repo_root() -> str | None:
  """The source checkout holding scone_jax (the directory of its pyproject.toml), or None
  for an installed package."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return root if os.path.isfile(os.path.join(root, 'pyproject.toml')) else None


def find_file(path: str) -> str | None:
  """A file named on the command line: as given (relative to the current directory),
  else relative to the repo root; None when neither exists. URLs are returned as given."""
  if paths.is_remote(path) or os.path.isfile(path):
    return path
  root = repo_root()
  if root is not None and not os.path.isabs(path):
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
      return candidate
  return None


def missing_file_message(path: str, what: str) -> str:
  """Why `path` was not found, naming where it was looked for and what to pass."""
  root = repo_root()
  where = (f'in the current directory ({os.getcwd()}) or the repo root ({root})'
           if root is not None else
           f'in the current directory ({os.getcwd()}); scone_jax is installed without its '
           'repository, so pass the file\'s full path')
  return f'{what} {path!r} does not exist {where}'


# ------------------------------------------------------------------------- shared flags


def define_workdir(flag_values: flags.FlagValues,
                   help_string: str = 'The run directory (local path or gs:// URL).',
                   default: str | None = None) -> flags.FlagHolder:
  """--workdir; required unless a default is given."""
  return flags.DEFINE_string('workdir', default, help_string, required=default is None,
                             flag_values=flag_values)


def define_config_file(flag_values: flags.FlagValues) -> flags.FlagHolder:
  """--config=experiments/X.py[:arg] plus --config.<key>=<value> overrides (train,
  prepare): the run's whole config."""
  return config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file, e.g. experiments/tiny.py (relative to the '
      'current directory or the repo root); --config.<key>=<value> overrides its keys.',
      flag_values=flag_values, lock_config=True)


def config_from_file(holder: flags.FlagHolder) -> config_lib.Config:
  """The validated Config of a `define_config_file` flag; CommandLineError if not given."""
  if holder.value is None:
    raise CommandLineError(f'--{holder.name}=experiments/<preset>.py is required (e.g. '
                           f'--{holder.name}=experiments/tiny.py)')
  return config_lib.from_configdict(holder.value)


def define_config_overrides(flag_values: flags.FlagValues) -> flags.FlagHolder:
  """--config.<section>.<key>=<value> overrides of a trained run's W/config.json (evaluate,
  export, generate); `overrides` reads and checks them."""
  base = config_lib.base_config()
  # ml_collections applies a config dict's overrides while DEFINING the flag (at import),
  # where an unknown key would raise outside `run`; left out here, it is an unknown flag
  # that parsing reports as one line.
  argv = [a for a in sys.argv if not a.startswith('--config.') or
          _has_key(base, a[len('--config.'):].split('=')[0])]
  return config_flags.DEFINE_config_dict(
      'config', base, 'Overrides of the run\'s W/config.json, e.g. '
      '--config.serve.temperature=0.', flag_values=flag_values, lock_config=True,
      sys_argv=argv)


def _has_key(cd: Any, dotted: str) -> bool:
  for part in dotted.split('.'):
    if not hasattr(cd, 'keys') or part not in cd:
      return False
    cd = cd[part]
  return True


def overrides(holder: flags.FlagHolder, sections: Sequence[str]) -> dict[str, Any]:
  """The --config.* overrides given, as {dotted key: value}; CommandLineError for a key
  outside `sections` (a trained run's model and data cannot change)."""
  flag = holder._flagvalues[holder.name]  # pylint: disable=protected-access
  values = config_flags.get_override_values(flag)
  bad = sorted(k for k in values if k.split('.')[0] not in sections)
  if bad:
    allowed = ', '.join(f'--config.{s}.*' for s in sections)
    raise CommandLineError(f'--config.{bad[0]} cannot be changed here: W/config.json fixes '
                           f'the trained run; only {allowed} apply')
  return values


# ------------------------------------------------------------------------------ running


def run(entry: str, main: Callable[[list[str]], Any], flag_values: flags.FlagValues) -> None:
  """Parses the command line into `flag_values` (and absl's own flags) and runs main.

  User errors end the process with one line and status 2; see the module docstring.
  """
  def parse(argv: list[str]) -> list[str]:
    # Parsed together: the entry's flags and absl's (--verbosity, --helpshort, ...), whose
    # help lists the main module's flags from the global FLAGS.
    for name, flag in list(flag_values._flags().items()):  # pylint: disable=protected-access
      if name == flag.name and name not in flags.FLAGS:
        flags.FLAGS[name] = flag
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
    for name, flag in flags.FLAGS._flags().items():  # pylint: disable=protected-access
      if name == flag.name and name not in flag_values:  # Short names come along.
        flag_values[name] = flag
    try:
      rest = flag_values(_find_config_files(argv, flag_values))
    except Exception as e:  # pylint: disable=broad-except
      # Everything flag parsing raises is about the command line: an unknown flag or
      # config key, a value of the wrong type, a config file that does not load.
      _fail(entry, e, _parse_error_message(e, argv), traceback_ok=False)
    flags.FLAGS.mark_as_parsed()
    return rest

  def wrapped(argv: list[str]) -> Any:
    logs.quiet_third_party_logs()
    try:
      if len(argv) > 1:
        raise CommandLineError(f'unexpected arguments {argv[1:]}: every input is a '
                               '--flag=value (see --helpshort)')
      _check_locations(flag_values)
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      workdir = flag_values['workdir'].value if 'workdir' in flag_values else ''
      message = user_error_message(e, workdir or '')
      if message is None and isinstance(e, json.JSONDecodeError):
        message = _corrupt_run_file(flag_values)
      if message is None:
        raise  # A bug: absl prints the traceback, status 1.
      _fail(entry, e, message)

  app.run(wrapped, flags_parser=parse)


def user_error_message(e: BaseException, workdir: str = '') -> str | None:
  """The one-line message of a user's mistake, or None when `e` is a bug. An OS error
  without a file name (a failed write of a full disk) is placed under `workdir`."""
  if isinstance(e, (UserError, app.UsageError)):
    return str(e)
  if isinstance(e, _MESSAGE_OS_ERRORS) and e.errno is None and e.args:
    return str(e)  # Raised by our code with a message naming the path and the fix.
  if isinstance(e, OSError) and e.errno in _OS_FIXES:
    where = (f'{e.filename} -> {e.filename2}' if e.filename2 else e.filename) or (
        f'writing under {workdir}' if workdir else '')
    return f'{where + ": " if where else ""}{e.strerror or e}; {_OS_FIXES[e.errno]}'
  return None


_MESSAGE_OS_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError,
                      IsADirectoryError, PermissionError)
_FILE_IN_THE_WAY = ('a file is where a directory must be: pass a directory as --workdir '
                    '(or move the file away)')
_NOT_WRITABLE = ('no permission to write there: pass a writable --workdir (or fix the '
                 'permissions)')
_FULL = 'free space there or pass a --workdir on another disk'
# errno -> the fix, for OS errors whose cause is a path the user gave or its disk.
_OS_FIXES = {
    errno.ENOENT: 'check the path given on the command line (or in the config)',
    errno.ENOTDIR: _FILE_IN_THE_WAY,
    errno.EEXIST: _FILE_IN_THE_WAY,
    errno.EISDIR: 'a directory is where a file must be: pass the file\'s path',
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.EROFS: 'the file system is read-only: pass a writable --workdir',
    errno.ENOSPC: f'the disk is full: {_FULL}',
    errno.EDQUOT: f'the disk quota is exceeded: {_FULL}',
}


def _show_traceback() -> bool:
  verbosity = flags.FLAGS['verbosity'].value if 'verbosity' in flags.FLAGS else 0
  return verbosity >= 1 or os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def _fail(entry: str, e: BaseException, message: str, traceback_ok: bool = True) -> None:
  if traceback_ok and _show_traceback():
    traceback.print_exception(e)
  # One line, whatever the message's own line breaks.
  line = ' '.join(message.split())
  sys.stderr.write(f'{entry}: {line}\n')
  sys.stderr.flush()
  sys.exit(USER_ERROR_STATUS)


def _parse_error_message(e: Exception, argv: Sequence[str]) -> str:
  if isinstance(e, UserError):
    return str(e)
  if isinstance(e, (AttributeError, KeyError)) and e.args:
    # ml_collections: an override of a key the config does not have. Its message is a
    # quoted repr: "'learnin_rate'\nDid you mean "learning_rate" instead of ...".
    text = str(e.args[0]).replace('\\n', ' ').replace("\\'", "'")
    key = re.search(r"'(\w+)'", text)
    name = key.group(1) if key else text
    given = next((a.split('=')[0] for a in argv
                  if a.startswith('--') and f'.{name}' in a.split('=')[0]), name)
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (f'{given}: the config has no key {name!r}; ' +
            (f'did you mean {hint.group(1)!r}?' if hint else
             'see scone_jax/config.py for the valid keys'))
  if isinstance(e, flags.UnrecognizedFlagError) and e.flagname.startswith('config.'):
    return (f'--{e.flagname}: the config has no key {e.flagname[len("config."):]!r}; see '
            'scone_jax/config.py for the valid keys')
  return f'{e} (see --helpshort)'


def _find_config_files(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  """argv with a relative config file resolved (current directory, then the repo root);
  CommandLineError when it is in neither."""
  names = [name for name, flag in flag_values._flags().items()  # pylint: disable=protected-access
           if type(flag.parser).__name__ == 'ConfigFileFlagParser']
  out = list(argv)
  for i, arg in enumerate(out):
    for name in names:
      prefix = f'--{name}='
      if arg.startswith(prefix):
        value = arg[len(prefix):]
        path, sep, extra = value.partition(':')
        found = find_file(path)
        if found is None:
          raise CommandLineError(missing_file_message(path, f'--{name}') +
                                 '; pass e.g. --config=experiments/tiny.py')
        out[i] = prefix + found + sep + extra
  return out


# Flags that name a directory the command reads or writes.
_DIRECTORY_FLAGS = ('workdir', 'root')
# Those whose gs:// location the command itself opens at once. Not the sweeps' --root: a
# dry run, or the TPU backend's launcher, need not reach it.
_PROBED_FLAGS = ('workdir',)
# The JSON files of a run directory a command may read (W/config.json, W/run.json, ...).
_RUN_JSON_FILES = ('config.json', 'run.json', 'eval.json', 'point.json')


def _corrupt_run_file(flag_values: flags.FlagValues) -> str | None:
  """After a JSONDecodeError: which of the workdir's JSON files does not parse, as a
  message naming it (None if none of them: then the error is not the user's)."""
  workdir = flag_values['workdir'].value if 'workdir' in flag_values else None
  if not workdir:
    return None
  for name in _RUN_JSON_FILES:
    path = paths.join(paths.resolve(workdir), name)
    try:
      json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
      return (f'{path} is truncated or corrupt ({e}); restore it from a copy of the run, '
              'or start the run again in a new --workdir')
    except OSError:
      continue  # Absent (or unreadable): not the file that failed to parse.
  return None


def _check_locations(flag_values: flags.FlagValues) -> None:
  """Fails before any work when a directory flag names a local file, or in seconds,
  naming the credentials fix, when a gs:// --workdir cannot be reached (no credentials,
  no network): the storage clients would otherwise retry for minutes before the run's
  first write fails."""
  for name in _DIRECTORY_FLAGS:
    value = flag_values[name].value if name in flag_values else None
    if not value:
      continue
    if not paths.is_remote(value):
      if os.path.exists(value) and not os.path.isdir(value):
        raise CommandLineError(f'--{name}={value} is a file, not a directory: pass a '
                               'directory (or move the file away)')
      continue
    if name not in _PROBED_FLAGS:
      continue
    outcome: list[BaseException | None] = []
    probe = threading.Thread(target=_probe, args=(value, outcome), daemon=True)
    probe.start()
    seconds = float(os.environ.get(REMOTE_PREFLIGHT_ENV, REMOTE_PREFLIGHT_SECONDS))
    probe.join(seconds)
    if not outcome or outcome[0] is not None:
      why = (f'no answer within {seconds:g} s (${REMOTE_PREFLIGHT_ENV} waits longer)'
             if not outcome else
             ' '.join(str(outcome[0]).split())[:300])
      raise CommandLineError(
          f'--{name}={value} cannot be reached ({why}): set up credentials (`gcloud auth '
          'application-default login`, or the VM\'s service account) and check the bucket '
          'name; for a local emulator set STORAGE_EMULATOR_HOST')


def _probe(location: str, outcome: list) -> None:
  try:
    paths.exists(location)
    outcome.append(None)
  except Exception as e:  # pylint: disable=broad-except
    outcome.append(e)
