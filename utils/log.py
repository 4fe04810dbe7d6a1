"""Logging set-up for the scripts, ANSI colouring for console text, and the shared progress-bar format.

Library modules only ever call ``logging.getLogger(__name__)``; :func:`setup_logging` is called once by a
script's ``main`` so that importing anything stays free of side effects.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable

# Progress bars across the project look like upstream's: a 10-character bar between the counters.
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"

# Top-level logger names of our code: the library packages and the scripts (run as __main__ or imported).
PACKAGE_LOGGERS = ("models", "utils", "quant", "bench", "train", "val", "export", "detect", "__main__")

_ANSI = {
    "black": "\033[30m",
    "red": "\033[31m",
    "green": "\033[32m",
    "yellow": "\033[33m",
    "blue": "\033[34m",
    "magenta": "\033[35m",
    "cyan": "\033[36m",
    "white": "\033[37m",
    "bright_black": "\033[90m",
    "bright_red": "\033[91m",
    "bright_green": "\033[92m",
    "bright_yellow": "\033[93m",
    "bright_blue": "\033[94m",
    "bright_magenta": "\033[95m",
    "bright_cyan": "\033[96m",
    "bright_white": "\033[97m",
    "bold": "\033[1m",
    "underline": "\033[4m",
    "end": "\033[0m",
}

# Marks the handler we install so a second call replaces it instead of stacking a duplicate.
_HANDLER_TAG = "_yq_console_handler"


def colorstr(*args: str) -> str:
    """Wrap the last argument in ANSI codes named by the others; a lone argument gets blue bold.

    Example: ``colorstr('red', 'bold', 'error:')``; ``colorstr('train: ')`` is blue and bold.
    """
    if not args:
        raise ValueError("colorstr needs at least the text to colour")
    *styles, text = args if len(args) > 1 else ("blue", "bold", args[0])
    unknown = [s for s in styles if s not in _ANSI]
    if unknown:
        raise ValueError(f"colorstr: unknown style(s) {unknown}; known: {sorted(_ANSI)}")
    return "".join(_ANSI[s] for s in styles) + f"{text}" + _ANSI["end"]


def setup_logging(verbose: bool = True, rank: int = -1) -> logging.Handler:
    """Send our packages' records to stderr as bare messages; call once from a script's ``main``.

    One handler goes on the root logger (replacing one from an earlier call); the levels are set on our
    own top-level loggers only, so third-party libraries keep the root's level and stay quiet. Records
    still propagate, which keeps pytest's ``caplog`` working after a script ran in-process.
    The main process (rank -1 or 0) logs INFO when ``verbose``; DDP workers log WARNING and above.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _HANDLER_TAG, True)
    root.addHandler(handler)
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    for name in PACKAGE_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return handler


def run_cli(run: Callable[..., Any], opt: Any, name: str,
            errors: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)) -> int:
    """A script's main: set up logging, call ``run(**vars(opt))``, and turn the library's errors (which
    carry file and reason in one line) into one log line and exit code 1 instead of a traceback."""
    setup_logging()
    try:
        run(**vars(opt))
    except errors as e:
        logging.getLogger(__name__).error(f"{name}: error: {e}")
        return 1
    return 0
