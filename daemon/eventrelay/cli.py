"""The `eventrelay` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import __version__, codec
from . import config as config_module
from . import log as log_setup
from . import migrate
from .admin import client as admin_client
from .admin import commands as admin_commands
from .limits import ensure_descriptors
from .store import StoreError

EX_CONFIG = 78  # sysexits.h: the unit file tells systemd not to restart-loop on a bad config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone early (`| head`) is then seen here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader closed the pipe: nobody reads the rest, which is not an error worth a traceback. Python's
        # documented way ("Note on SIGPIPE"): stdout onto /dev/null, so the flush at exit fails no more, and 1.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The `eventrelay` command line; the Debian package's shell completions are generated from it (shtab)."""
    parser = argparse.ArgumentParser(prog="eventrelay",
                                     description="Event delivery daemon: webhooks, SQS and STOMP, at least once.")
    parser.add_argument("--version", action="version", version=f"eventrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = (f"the YAML configuration file (default: ${admin_client.CONFIG_ENV}, "
                   f"else {admin_client.DEFAULT_CONFIG})")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", metavar="FILE", help=config_help)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", "-c", metavar="FILE", help=config_help)
    check.add_argument("--explain", metavar="EVENT.json",
                       help="also say which integrations this event (a file, or - for stdin) would reach, and why")

    receive = commands.add_parser("receive", help="run a local test receiver that prints each webhook it gets")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--port", type=int, default=9000, help="default 9000, as in config.example.yaml")
    receive.add_argument("--secret-key", help="answer 401 unless X-MOLTIN-SECRET-KEY carries this value")
    receive.add_argument("--secret", metavar="whsec_…",
                         help="the integration's signing_secret: answer 401 unless the Standard Webhooks "
                              "signature verifies and its timestamp is within 5 minutes")
    receive.add_argument("--status", type=int, default=204, help="status to answer (e.g. 500 to watch retries)")

    admin_commands.add_commands(commands)
    migrate.add_command(commands)
    _complete_file_names(parser)
    return parser


def _complete_file_names(parser: argparse.ArgumentParser) -> None:
    """Options whose argument is a FILE complete file names in the shell. shtab reads the `complete`
    attribute (the value of its shtab.FILE); argparse ignores it, so shtab stays a build-time tool."""
    for action in parser._actions:
        if action.metavar == "FILE":
            action.complete = {"bash": "_shtab_compgen_files", "zsh": "_files"}  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _complete_file_names(subparser)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None):
        return args.func(args)
    if args.command == "receive":
        from .receiver import SigningSecretError
        from .receiver import serve as serve_receiver

        try:
            serve_receiver(args.host, args.port, args.secret_key, args.status, args.secret)
        except SigningSecretError as e:
            print(f"eventrelay: --secret {e}", file=sys.stderr)
            return admin_client.EXIT_USAGE
        return 0
    path, why = config_path(args.config)
    if args.command == "check-config":
        return check_config(path, why, args.explain)
    return run_daemon(path, why)


def config_path(given: str | None) -> tuple[str, str]:
    """The config file `run` and `check-config` read, and where that choice came from (for their errors)."""
    if given:
        return given, "--config"
    from_env = os.environ.get(admin_client.CONFIG_ENV)
    if from_env:
        return from_env, f"named by ${admin_client.CONFIG_ENV}"
    return admin_client.DEFAULT_CONFIG, f"the default, as neither --config nor ${admin_client.CONFIG_ENV} is set"


def check_config(path: str, why: str = "--config", explain: str | None = None) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        _print_config_error(e, why, "invalid configuration:")
        return 1
    enabled = sum(i.enabled for i in config.integrations)
    print(f"{path}: OK, {len(config.integrations)} integration(s), {enabled} enabled")
    return explain_event(config, explain) if explain is not None else 0


def explain_event(config: config_module.Config, source: str) -> int:
    """Which integrations an event would reach, and for each of the others the first reason why not."""
    from .events import EventError, parse_event

    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()  # noqa: SIM115
        event = parse_event(codec.loads(text.encode()))
    except (OSError, ValueError, EventError) as e:
        print(f"eventrelay: {source}: {e}", file=sys.stderr)
        return 1
    content = {"type": event.type, "data": event.data, "included": event.included}
    known = "" if config.catalogue.knows(event.type) else " (not in the catalogue: accepted, stored, counted unrouted)"
    print(f"{event.type}{known}:")
    reached = 0
    for integration in config.integrations:
        if not integration.enabled:
            why = "no: disabled in the configuration"
        elif not integration.matcher.matches(event.type):
            why = f"no: observes {', '.join(integration.observes)}"
        elif integration.accepts is not None and not integration.accepts(content):
            why = f"no: its filter refuses it ({codec.dumps(integration.filter)})"
        else:
            why = "yes" + (", its filter accepts it" if integration.accepts is not None else "")
            reached += 1
        print(f"  {integration.name}: {why}")
    print(f"reaches {reached} integration(s)")
    return 0


def run_daemon(path: str, why: str = "--config") -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        _print_config_error(e, why, "invalid configuration, not starting:")
        return EX_CONFIG
    log_setup.setup(config.log)
    tune_gc()
    ensure_descriptors(config)
    from .notify import Notifier
    from .service import Service  # imported late: check-config stays fast and needs no event loop

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        service = Service(config, Notifier.from_environ())
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, service.request_reload)
        await service.serve(stop)

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve())
    except (StoreError, OSError, BaseExceptionGroup) as error:
        # Start-up failures an operator can fix (port taken, database locked or unwritable): one line each.
        leaves = _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
        if not all(isinstance(e, (StoreError, OSError)) for e in leaves):
            raise
        for leaf in leaves:
            print(f"eventrelay: cannot run: {leaf}", file=sys.stderr)
        return 1
    return 0


def _print_config_error(error: config_module.ConfigError, why: str, what: str) -> None:
    print(f"{error.source}: {what}", file=sys.stderr)
    for line in error.errors:
        print(f"  {line}", file=sys.stderr)
    if why != "--config":
        # The operator may not know which file was read: say where the name came from and how to choose.
        print(f"(read {error.source}: {why}; name another file with --config FILE)", file=sys.stderr)


def tune_gc() -> None:
    """Fewer cyclic garbage collections: a batch of 100 events is thousands of fresh dicts and strings, and
    the default thresholds ran a collection every 700 of them, each traversing what was still alive. Events
    make no reference cycles; the few objects that do (tasks, exceptions) are still collected, just less
    often. What exists at start-up (modules, config) is frozen out of every collection. What it saved is in
    docs/performance-notes.md."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The daemon's event loop: uvloop where it is installed (a dependency on Linux), the standard one otherwise.

    uvloop makes ingest faster (docs/performance-notes.md). The benchmarks run their baselines on this same
    loop, so a ratio compares our work, not two loops.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for e in group.exceptions:
        leaves.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return leaves
