"""What every command of the CLI prints through: two rich consoles, escaping, one-line errors.

Text that comes from outside (file names, error messages, species, endpoints) goes through
:func:`esc` before it reaches a rich console, so ``Image [red].sxm`` or
``pip install "stm-agent[parquet]"`` print as written instead of being read as rich markup.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["console", "err_console", "esc", "fail", "typer_app"]

console = Console()
err_console = Console(stderr=True)


def esc(value: Any) -> str:
    """``str(value)`` with rich markup escaped (square brackets survive printing)."""
    return escape(str(value))


def fail(e: object, code: int = 2) -> NoReturn:
    """Print ``error: <e>`` on stderr (one line, escaped) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {esc(e)}", soft_wrap=True)
    raise typer.Exit(code=code)


def typer_app(**kw: Any) -> typer.Typer:
    """A ``typer.Typer`` with plain help: no rich markup in help texts (brackets such as
    ``stm-agent[export]`` stay), flags shown as flags (``--px``, not ``--px <bool>``)."""
    kw.setdefault("rich_markup_mode", None)
    kw.setdefault("no_args_is_help", True)
    return typer.Typer(**kw)
