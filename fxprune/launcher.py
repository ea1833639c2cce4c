"""The ``fxprune`` console script: a light launcher around :func:`fxprune.cli.main`.

Importing this module imports neither torch nor the command line (``import fxprune`` is light),
so a Ctrl-C while the command is still starting (importing torch, torchvision, ...) is caught
here and is one line on stderr and exit code 130, like a Ctrl-C during the work, instead of a
traceback. ``pyproject.toml`` names :func:`main` as the script's entry point and
``python -m fxprune`` runs it too.

Example:
    >>> import subprocess, sys
    >>> subprocess.run([sys.executable, "-c", "import fxprune.launcher, sys; print('torch' in sys.modules)"],
    ...                capture_output=True, text=True).stdout.strip()
    'False'
"""
from __future__ import annotations

import sys
from typing import Sequence

NOTHING_WRITTEN = "fxprune: interrupted; nothing was written"


def _interrupted() -> str:
    """The line for an interrupt that escaped the command: what it had written, if it got that far."""
    cli_io = sys.modules.get("fxprune.cli_io")
    return cli_io.interrupted_message() if cli_io is not None else NOTHING_WRITTEN


def main(argv: Sequence[str] | None = None) -> int:
    """Import the command line and run it; Ctrl-C at any point is one line and exit code 130.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["prune", "no_such_net"])
        >>> code, err.getvalue().startswith("fxprune: error: unknown model 'no_such_net'")
        (2, True)
    """
    try:
        from .cli import main as cli_main
        return cli_main(argv)
    except KeyboardInterrupt:
        print(_interrupted(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
