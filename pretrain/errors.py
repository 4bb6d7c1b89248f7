"""One error boundary for every command-line verb: a known failure is one line on stderr, not a traceback.

    from pretrain.errors import run_cli
    sys.exit(run_cli(main))          # main(argv) -> int; argv defaults to sys.argv[1:]

`lightspan <verb>` (pretrain/cli.py) and `lightspan eval` / `python -m evaluation` (evaluation/cli.py) run inside
it. `python -m pretrain` / `torchrun -m pretrain` (pretrain/__main__.py -> pretrain.train.main) can use it the
same way: `sys.exit(run_cli(main))` in pretrain/__main__.py.

Known errors print `error: <message>` (one line; an OSError names its path) on stderr and give an exit status:

    ConfigError, parallel.mesh.LayoutError, other ValueError     2   (the input cannot run; the message says the fix)
    OSError: FileNotFoundError, PermissionError, ENOSPC, ...      2
    FloatingPointError (the loss or gradients went non-finite)    1   (the run started and failed)
    KeyboardInterrupt                                            130  (128 + SIGINT, the shell's convention)

Anything else (TypeError, KeyError, AttributeError, RuntimeError, ...) is a bug and propagates with its
traceback. `--debug` anywhere in argv (removed before the verb parses its arguments) or LIGHTSPAN_DEBUG=1 in
the environment lets the known errors propagate too, so their traceback shows. Nested boundaries (`lightspan
eval` inside `lightspan`) share the outer one's debug setting.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

DEBUG_FLAG = "--debug"
USAGE_ERROR = 2
RUN_FAILED = 1
INTERRUPTED = 130

_debug = False  # set by the outermost run_cli for the nested ones


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --debug or LIGHTSPAN_DEBUG=1 asks for tracebacks, argv without --debug)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    env = os.environ.get("LIGHTSPAN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return _debug or env or len(rest) != len(argv), rest


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for a known error; None for anything else (a bug)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    if isinstance(exc, FloatingPointError):
        return _one_line(str(exc) or "non-finite value"), RUN_FAILED
    if isinstance(exc, OSError):
        return _one_line(_os_message(exc)), USAGE_ERROR
    if isinstance(exc, ValueError):  # ConfigError and LayoutError are ValueErrors
        return _one_line(str(exc) or type(exc).__name__), USAGE_ERROR
    return None


def _os_message(exc: OSError) -> str:
    if exc.filename is None or not exc.strerror:  # raised with a message of our own: it names its path
        return str(exc) or type(exc).__name__
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    msg = f"{exc.strerror}: {where}"
    if exc.errno == errno.ENOSPC:
        msg += " (free some space, or write elsewhere: train.out_dir / --out)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg += " (check the permissions, or write elsewhere)"
    return msg


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_cli(fn: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """fn(argv without --debug) inside the boundary; returns its exit status (None counts as 0)."""
    global _debug
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    outer, _debug = _debug, debug
    try:
        return fn(argv) or 0
    except BaseException as exc:  # noqa: BLE001 - sorted into known errors and bugs right here
        known = None if debug else describe(exc)
        if known is None:
            raise
        message, status = known
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return status
    finally:
        _debug = outer
