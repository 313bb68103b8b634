"""What every command of the CLI shares: two rich consoles, escaping, one-line errors, the
configuration with command-line overrides.

Text that comes from outside (file names, error messages, species, endpoints) goes through
:func:`esc` before it reaches a rich console, so ``Image [red].sxm`` or
``pip install "stm-agent[parquet]"`` print as written instead of being read as rich markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from stm_agent.agent.config import AgentConfig

__all__ = ["cli_config", "console", "err_console", "esc", "fail", "typer_app"]

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


#: Config keys set by command-line options, and the option a config error about them names.
_OPTION_OF = {"match.threshold": "--threshold", "channel": "--channel", "references.folder": "--refs",
              "acquisition.folder": "--folder", "publish.endpoint": "--endpoint"}


def cli_config(path: Path | None, refs: Path | None = None, **over: Any) -> "AgentConfig":
    """The configuration of a command: ``path`` (or the default), ``--refs``, and options given as
    dotted keys (``**{"match.threshold": 0.8}``; None = not given). A bad value prints one line
    naming the option (or the file) and exits with 2."""
    from stm_agent.agent.config import load_config
    from stm_agent.agent.errors import StmAgentError

    overrides: dict = {k: v for k, v in over.items() if v is not None}
    if refs is not None:
        overrides["references.folder"] = str(refs)
    try:
        return load_config(path, overrides=_nest(overrides),
                           override_origins={k: _OPTION_OF.get(k, "command line") for k in overrides})
    except StmAgentError as e:
        fail(e)


def _nest(flat: dict) -> dict:
    """``{"match.threshold": 0.8}`` -> ``{"match": {"threshold": 0.8}}``."""
    out: dict = {}
    for k, v in flat.items():
        parts = k.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        if isinstance(v, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(v)
        else:
            d[parts[-1]] = v
    return out
