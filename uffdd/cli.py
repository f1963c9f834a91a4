"""The ``uffdd`` command line: parse arguments, call into the package, print results.

No business logic lives here: ``serve`` runs :mod:`uffdd.daemon`, ``demo`` runs
:mod:`uffdd.lab.demo`, ``status`` asks a running daemon and renders with :mod:`uffdd.status`.

The lab subcommands (``demo``, ``chaos``, ``bench``) are the one place the core reaches
into :mod:`uffdd.lab`, and only lazily, inside the functions that build their arguments
or run them: no daemon module imports the lab, and importing :mod:`uffdd.cli` alone
loads none of it (tests/test_layout.py holds both rules).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import trio

from uffdd import __version__
from uffdd import config as config_mod
from uffdd.errors import ConfigError, UffddError

DESCRIPTION = """\
uffdd moves a running VM's memory during the postcopy phase of a live migration:
the destination VMM hands it its userfaultfds, and every page the guest touches
is fetched from the uffdd on the source host (the rest streams in behind).

Run `uffdd serve` on every host (usually via systemd), point VMMs at its socket,
and try `uffdd demo` to see a whole migration on this machine.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdd", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"uffdd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon",
                           description="Run the daemon in the foreground (systemd: Type=notify).")
    serve.add_argument("--config", metavar="PATH", help="TOML config file (default: built-in "
                       "defaults; see deploy/uffdd.toml)")
    serve.add_argument("--api-socket", metavar="PATH", help="VMM API Unix socket [api.socket]")
    serve.add_argument("--peer-listen", metavar="HOST:PORT", help="peer TCP address [peer.listen]")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="Prometheus endpoint, '' to disable [metrics.listen]")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--enable-fault-injection", action="store_true",
                       help="accept the 'inject' request (demos and tests only) "
                       "[testing.fault_injection]")
    serve.add_argument("--check-config", action="store_true",
                       help="load and check the config, print it, and exit")

    demo = sub.add_parser("demo", help="run a whole postcopy migration on this machine",
                          description="Start two daemons on loopback, a source VMM and a "
                          "destination VMM, migrate guest RAM postcopy and verify every byte.")
    from uffdd.lab import demo as demo_mod
    demo_mod.add_arguments(demo)

    chaos = sub.add_parser("chaos", help="migrate repeatedly while injecting faults",
                           description="Run migrations between two local daemons while cutting, "
                           "resetting and stalling the link, killing daemons and VMMs and "
                           "corrupting pages; report pages lost and hung vCPUs.")
    from uffdd.lab import chaos as chaos_mod
    chaos_mod.add_arguments(chaos)

    bench = sub.add_parser("bench", help="measure the data path against the C yardstick",
                           description="Run the benchmark scenarios against real daemons on "
                           "loopback (README, Performance); ratios are uffdd / reference.")
    from uffdd.lab import bench as bench_mod
    bench_mod.add_arguments(bench)

    status = sub.add_parser("status", help="show the sessions of a running daemon")
    status.add_argument("--api-socket", metavar="PATH", default=config_mod.ApiConfig().socket)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--session", help="only this session")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from uffdd.lab import demo
        return demo.run(args)
    if args.command == "chaos":
        from uffdd.lab import chaos
        return chaos.run(args)
    if args.command == "bench":
        from uffdd.lab import bench
        return bench.run(args)
    if args.command == "status":
        return _status(args)
    _parser().print_help()
    return 2


def _serve(args: argparse.Namespace) -> int:
    from uffdd import daemon, logs
    source = args.config or "<command line>"
    try:
        cfg = config_mod.load(args.config)
        cfg = config_mod.override(
            cfg,
            api={"socket": args.api_socket} if args.api_socket else {},
            peer={"listen": args.peer_listen} if args.peer_listen else {},
            metrics={"listen": args.metrics_listen} if args.metrics_listen is not None else {},
            log={"level": args.log_level} if args.log_level else {},
            testing={"fault_injection": True} if args.enable_fault_injection else {},
        )
        config_mod.from_dict(_as_dict(cfg), source)
        if args.check_config:
            # The very checks serve makes before it binds (TLS files, dates, plaintext
            # rule): a config that passes here is not refused by serve for them.
            daemon.preflight(cfg, source)
    except ConfigError as e:
        print(f"uffdd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        # The start-up checks too (plaintext rule, TLS files), so that a file this
        # accepts is one the daemon starts with.
        from uffdd import tls
        try:
            config_mod.check_peer_security(cfg.peer, "peer link")
            tls.check_contexts(cfg.peer)
        except (UffddError, OSError, ValueError) as e:
            print(f"uffdd: configuration error: {e}", file=sys.stderr)
            return 2
        print(cfg)
        return 0
    logs.setup_logging(cfg.log.level)
    try:
        trio.run(daemon.run_daemon, cfg)
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # sorted below; anything else is re-raised
        return _start_failure(e)
    return 0


def _start_failure(e: BaseException) -> int:
    """A start-up error as one line each, exit status 1; anything else (a bug) re-raised.

    Errors raised inside the daemon's nursery arrive wrapped in exception groups.
    """
    leaves = _leaves(e)
    if not leaves or not all(isinstance(x, UffddError | OSError) for x in leaves):
        raise e
    for leaf in leaves:
        prefix = "" if isinstance(leaf, UffddError) else "cannot start: "
        print(f"uffdd: {prefix}{leaf}", file=sys.stderr)
    return 1


def _leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[e]``."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in _leaves(inner)]
    return [e]


def _as_dict(cfg: config_mod.Config) -> dict[str, object]:
    return dataclasses.asdict(cfg)


def _status(args: argparse.Namespace) -> int:
    from uffdd import status
    from uffdd.client import Client, ClientError
    try:
        with Client(args.api_socket, timeout=10) as client:
            sessions = client.status(args.session)
    except ClientError as e:
        print(f"uffdd status: {e}", file=sys.stderr)
        return 1
    render = status.render_status_json if args.json else status.render_status_table
    print(render(sessions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
