"""How every command ends: one line `error: ...` on stderr and a non-zero exit, or, with
`--debug`, the traceback.

train.py, eval.py, `python -m cogvlm_jax.chat`, `python -m cogvlm_jax.convert` and
`python -m cogvlm_jax.plan` run their work through `run_main`. A user's mistake (a missing
folder, truncated weights, a bad config.json, a setting out of range) surfaces as an
exception deep inside JAX, Orbax or a reader; a traceback of that hides the one sentence the
user needs, so it is printed as that sentence. Each command maps the errors it knows to its
documented exit status (`codes`); any other exception is still one line, exit 1, with a hint
that `--debug` shows where it came from.
"""

from __future__ import annotations

import pickle
import sys
from typing import Callable, Optional, Sequence, TextIO

DEBUG_HELP = "show the Python traceback of an error instead of one line"

EXIT_UNEXPECTED = 1  # an error no command documents (a bug, or input we do not recognise)
EXIT_BAD_INPUT = 2  # bad settings, a missing / unreadable / mismatched file
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Exceptions that mean "the input is bad" wherever they come from: a file that is missing or
# unreadable (OSError), a value or file content that does not fit (ValueError: JSON errors,
# Orbax tree mismatches, CheckpointMismatch, ConfigError), a name not found (LookupError),
# a pickle refused by weights_only loading.
BAD_INPUT = (OSError, ValueError, LookupError, pickle.UnpicklingError)

MAX_MESSAGE = 1000  # characters: Orbax / tensorstore messages can run to pages


def one_line(error: BaseException) -> str:
  """`error` as one line: its message with newlines folded, capped at MAX_MESSAGE."""
  text = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = f"missing {error.args[0]!r}"  # str(KeyError) is only the quoted key
  if len(text) > MAX_MESSAGE:
    text = text[:MAX_MESSAGE] + " ..."
  return text


def exit_code(error: BaseException, codes: Sequence[tuple[type, int]]) -> Optional[int]:
  """The status of the first (type, code) in `codes` that `error` is; None for none."""
  for kind, code in codes:
    if isinstance(error, kind):
      return code
  return None


def run_main(fn: Callable[[], Optional[int]], *, debug: bool,
             codes: Sequence[tuple[type, int]] = (),
             bad_input_code: int = EXIT_BAD_INPUT, stderr: TextIO | None = None) -> int:
  """Runs `fn()` and returns its exit status (None counts as 0).

  An exception becomes one `error: ...` line on stderr and the status of the first matching
  entry of `codes`, else `bad_input_code` for BAD_INPUT errors, else EXIT_UNEXPECTED (the
  line then names the exception type and points at --debug). Ctrl-C is EXIT_INTERRUPTED.
  With `debug`, exceptions propagate (the interpreter prints the traceback). SystemExit
  passes through untouched: argparse and absl have already said what was wrong.
  """
  stderr = stderr or sys.stderr
  try:
    status = fn()
    return 0 if status is None else int(status)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    if debug:
      raise
    print("error: interrupted; nothing half-written was kept", file=stderr, flush=True)
    return EXIT_INTERRUPTED
  except Exception as e:  # noqa: BLE001 -- the point: no traceback for the user
    if debug:
      raise
    code = exit_code(e, codes)
    message = one_line(e)
    if code is None and isinstance(e, BAD_INPUT):
      code = bad_input_code
    if code is None:
      code = EXIT_UNEXPECTED
      message = (f"{type(e).__name__}: {message} (unexpected; rerun with --debug for the "
                 "traceback)")
    print(f"error: {message}", file=stderr, flush=True)
    return code


def add_debug_argument(parser) -> None:
  """`--debug` on an argparse parser."""
  parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
