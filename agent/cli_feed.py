"""``stm-agent replay``: a simulated STM controller feeding the agent's controller source.

Registered in :mod:`agent.cli` with ``app.command()(replay)``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import typer

from stm_agent.adapters.replay import MODES, ReplayFeed, SentFrame
from stm_agent.agent.console import console, err_console, esc, fail
from stm_agent.agent.errors import StmAgentError


def replay(
    folder: Path = typer.Argument(..., help="Folder of Nanonis .sxm scans to replay (sorted by name)."),
    endpoint: str = typer.Option("tcp://127.0.0.1:5560", "--endpoint", help="ZeroMQ endpoint to BIND "
                                 "(the agent's controller.endpoint connects to it)."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between frames (0 = as fast as possible)."),
    mode: str = typer.Option("sxm", "--mode", help="scan.sxm (file bytes), scan.array (one frame as a raw "
                             "array) or scan.saved (the file path): sxm | array | saved."),
    count: int = typer.Option(0, "--count", help="Frames in total, cycling through the files (0 = each file once)."),
    unique: bool = typer.Option(False, "--unique/--no-unique", help="Make every frame distinct content "
                                "(load tests: repeats are otherwise skipped as duplicates)."),
    wait_subscriber: float = typer.Option(10.0, "--wait-subscriber", help="Seconds to wait for the agent to "
                                          "subscribe before sending (0 = do not wait)."),
    channel: str = typer.Option("Z", "--channel", help="Channel sent in array mode."),
    direction: str = typer.Option("forward", "--direction", help="forward | backward (array mode)."),
    ack: bool = typer.Option(False, "--ack/--no-ack", help="Acknowledged mode (the agent's controller.ack: "
                             "true): ROUTER socket; every frame is kept and sent again until the agent "
                             "acknowledges it, so a killed agent loses nothing."),
    curve_secret: Optional[Path] = typer.Option(None, "--curve-secret", help="Serve with CURVE using this "
                                                "zmq.auth secret certificate (controller.key_secret); the agent "
                                                "pins the public key (controller.curve_server_key)."),
) -> None:
    """Replay a folder of scans as the STM controller would publish them (a simulated controller).

    Binds ENDPOINT, waits for the agent to subscribe, then publishes one frame every INTERVAL
    seconds on scan.sxm / scan.array / scan.saved (see docs/sources.md). Prints each frame sent
    (index, file, sha256) and a summary. Ctrl-C stops early. With --ack it waits at the end until
    the agent has acknowledged every frame (sending again what it did not).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        feed = ReplayFeed(folder, endpoint, mode=mode, interval_s=interval, count=count,  # type: ignore[arg-type]
                          unique=unique, channel=channel, direction=direction, ack=ack,
                          curve_secret_file=curve_secret)
    except StmAgentError as e:
        fail(e)
        return
    stop = threading.Event()
    sent: list[SentFrame] = []
    with feed:
        console.print(f"replaying [bold]{len(feed.files)}[/] scan(s) from {esc(folder)} on [bold]{esc(feed.endpoint)}[/] "
                      f"as scan.{mode}, {feed.count if not feed.once else len(feed.files)} frame(s), "
                      f"every {interval:g} s" + (" (unique)" if unique else ""), soft_wrap=True)
        if wait_subscriber > 0:
            console.print(f"[dim]waiting up to {wait_subscriber:g} s for a subscriber ...[/]")
            if not feed.wait_for_subscriber(wait_subscriber):
                console.print("[yellow]no subscriber yet: sending anyway (frames nobody receives are lost)[/]")

        def show(f: SentFrame) -> None:
            sent.append(f)
            console.print(f"  {f.index:5d}  {f.topic:10s}  {esc(f.name)}  [dim]{f.frame_id[:12]}  {f.size} bytes[/]",
                          soft_wrap=True)

        try:
            feed.run(on_sent=show, stop=stop)
        except KeyboardInterrupt:
            stop.set()
            console.print("[yellow]interrupted[/]")
        except StmAgentError as e:
            fail(e)
        for name, why in feed.skipped.items():
            err_console.print(f"[yellow]skipped[/] {esc(name)}: {esc(why)}", soft_wrap=True)
    console.print(f"sent [bold]{len(sent)}[/] frame(s), {len({f.frame_id for f in sent})} distinct")
    if ack:
        states = {}
        for v in feed.acked.values():
            states[v] = states.get(v, 0) + 1
        console.print(f"acknowledged {len(feed.acked)} ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}); "
                      f"sent again {feed.resent}; not acknowledged {feed.unacked}")
        if feed.unacked:
            raise typer.Exit(code=1)
