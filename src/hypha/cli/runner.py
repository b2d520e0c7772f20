"""Running one role from the command line: load its config, set up logging, ``trio.run`` it.

Owns what every role command (gateway, worker, scheduler, data) shares: the user-facing
error line and exit codes (2 for bad configuration or input, 1 for runtime failures),
loading and checking a role's config (``--validate`` stops there), signal handling (SIGINT,
SIGTERM and SIGHUP cancel the running node, which shuts down cleanly and exits with 128 + the
signal's number, 130 or 143 as a shell reports it) and turning a ``HyphaError``,
alone or inside a nursery's exception group, into that one line. Argument parsing stays in
``main.py``.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio
import typer
from rich.console import Console

from hypha.config import check_files, load_config
from hypha.config.schema import NetworkSection
from hypha.errors import ConfigError, HyphaError, first_hypha_error, leaves
from hypha.local.logs import init_logging

C = TypeVar("C", bound=NetworkSection)

err = Console(stderr=True, soft_wrap=True)
"""Where every message for people goes (stdout is left for results, such as probe's)."""


def fail(message: str, problems: list[str] | None = None, code: int = 2) -> NoReturn:
    """Print a user-facing error (and each problem under it) and exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    for problem in problems or []:
        err.print(f"  - {problem}", highlight=False, markup=False)
    raise typer.Exit(code)


def where(path: Path | None) -> str:
    """How messages name a config file (``<defaults>`` when there is none)."""
    return str(path) if path else "<defaults>"


def load_role_config(
    role: str, path: Path | None, validate: bool, overrides: dict[str, Any]
) -> NetworkSection:
    """Load a role's config and check the files it names; with ``validate`` only check it."""
    try:
        config = load_config(role, path, overrides=overrides)
        problems = check_files(config, where(path))
    except ConfigError as exc:
        fail(str(exc), exc.problems)
    if problems:
        fail(f"{len(problems)} problem(s) in {path}", problems)
    if validate:
        err.print(f"{where(path)}: {role} config is valid")
        raise typer.Exit(0)
    return config


def net_overrides(listen: list[str] | None, gateway: list[str] | None = None) -> dict[str, Any]:
    """Config overrides from ``--listen`` and ``--gateway`` (absent flags override nothing)."""
    out: dict[str, Any] = {}
    if listen:
        out["listen_addresses"] = listen
    if gateway:
        out["gateway_addresses"] = gateway
    return out


def run_role(
    role: str,
    config_type: type[C],
    path: Path | None,
    serve: Callable[[C], Awaitable[None]],
    *,
    validate: bool,
    verbose: bool,
    overrides: dict[str, Any],
    check: Callable[[C], str] | None = None,
) -> None:
    """The whole of a role command: load the config, check it, log, run ``serve(config)``.

    Args:
        role: gateway, worker, scheduler or data (names the config section and log lines).
        config_type: The role's config class.
        path: ``--config``, or None for defaults and environment only.
        serve: Runs the node until it ends or is cancelled.
        validate: ``--validate``: exit 0 after the checks instead of running.
        verbose: ``--verbose``: debug logs, libp2p's included.
        overrides: Config values from flags (see ``net_overrides``).
        check: Further checks of the loaded config; calls ``fail`` on a problem, else
            returns a detail for the ``--validate`` line ("" for none).

    Raises:
        typer.Exit: always, with the exit code, unless the node ended normally.
    """
    config = load_role_config(role, path, False, overrides)
    assert isinstance(config, config_type)
    detail = check(config) if check is not None else ""
    if validate:
        err.print(f"{where(path)}: {role} config is valid{f' ({detail})' if detail else ''}")
        raise typer.Exit(0)
    init_logging(role, verbose=verbose)
    run_until_signal(role, lambda: serve(config))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a node (or ``hypha up``) cleanly; each exits with 128 + its number."""


def signal_exit_code(signum: int) -> int:
    """The shell's exit status for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


async def cancel_on_stop_signal(
    main: Callable[[], Awaitable[None]], on_signal: Callable[[int], None]
) -> None:
    """Run ``main``; the first of ``STOP_SIGNALS`` calls ``on_signal(signum)`` and cancels it.

    Signals that come later, while ``main`` shuts down, are received and ignored: trio's
    receiver re-raises signals still pending when it closes, and a SIGINT handled by Python's
    default handler is a KeyboardInterrupt in the middle of that shutdown (a traceback, and
    children left running). Only one that arrives in the instant between ``main``'s end and
    the receiver's close takes the default action. Call it on the main thread only.

    Cancellation:
        ``main`` is cancelled by the signal; cleanup it runs shielded still runs to its end.
    """
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def watch() -> None:
                async for signum in signals:
                    if not scope.cancel_called:
                        on_signal(signum)
                        scope.cancel()

            nursery.start_soon(watch)
            with scope:
                await main()
            nursery.cancel_scope.cancel()


def run_until_signal(role: str, main: Callable[[], Awaitable[None]]) -> None:
    """``trio.run`` ``main`` and cancel it cleanly on SIGINT, SIGTERM or SIGHUP.

    The first signal prints one line and cancels ``main``; once it has shut down the process
    exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a process
    killed by it would, so supervisors see that it did not finish. Later signals are ignored
    while it shuts down (see ``cancel_on_stop_signal``); whoever wants it gone at once sends
    SIGKILL, as ``hypha up`` does after its grace period.

    A ``HyphaError`` (also the first one inside an exception group) becomes one error line
    and exit code 1, 2 for a ``ConfigError`` (a node that refuses its set-up at start); a
    group without one is a bug: its innermost tracebacks are printed.

    Raises:
        typer.Exit: with 128 + the signal's number after a signal, or the error's code.
    """
    received: list[int] = []

    def on_signal(signum: int) -> None:
        err.print(f"{role}: received {signal.Signals(signum).name}, shutting down")
        received.append(signum)

    async def runner() -> None:
        if threading.current_thread() is threading.main_thread():
            await cancel_on_stop_signal(main, on_signal)
        else:
            await main()  # signal handlers can only be installed on the main thread

    try:
        trio.run(runner)
    except HyphaError as exc:
        _fail_with(exc)
    except BaseExceptionGroup as group:
        leaf = first_hypha_error(group)
        if leaf is None:
            _print_leaves(group)
            fail("internal error (traceback above); please report it", code=1)
        _fail_with(leaf)
    if received:
        raise typer.Exit(signal_exit_code(received[0]))


def _fail_with(exc: HyphaError) -> NoReturn:
    if isinstance(exc, ConfigError):
        details = exc.problems if exc.problems != [str(exc)] else None
        fail(str(exc), details, code=2)
    fail(str(exc), code=1)


def _print_leaves(group: BaseExceptionGroup[Any]) -> None:
    """Nested nursery groups bury the real error: print only the innermost tracebacks."""
    for exc in leaves(group):
        if not isinstance(exc, trio.Cancelled):
            sys.stderr.write("".join(traceback.format_exception(exc)))
