"""``python -m syncfed``: project tools, one subcommand each in :mod:`syncfed.cli`.

Usage::

    python -m syncfed provision project.toml -o startup/
    python -m syncfed models --registry runs/registry list|show ID|best METRIC|export ID PATH|prune|du
    python -m syncfed analytics --workers alice=ws://localhost:8777,... label-histogram|feature-stats|quantiles
    python -m syncfed serve --config server.toml
    python -m syncfed admin --config admin.toml workers|submit FILE|jobs|status JOB|abort JOB|logs JOB|...
"""

from __future__ import annotations

import sys

from .cli.common import Parser, run_program, stdout_closed

__all__ = ["PROGRAM", "main"]

PROGRAM = "python -m syncfed"


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Their own parsers: they read --config (server.toml, admin.toml) like the run_websocket_*.py programs.
    # Imported when chosen: the console would otherwise load torch (through analytics) for every command.
    if argv[:1] == ["serve"]:
        from .cli import serve

        return serve.main(argv[1:])
    if argv[:1] == ["admin"]:
        from .cli import admin

        return admin.main(argv[1:])
    from .cli import analytics, models, provision

    parser = Parser(prog=PROGRAM, description="syncfed project tools")
    commands = parser.add_subparsers(dest="command", required=True)
    provision.configure(
        commands.add_parser(
            "provision", help="make a private CA and a startup kit (key, certificate, config) per participant"
        )
    )
    models.configure(
        commands.add_parser(
            "models",
            help="list, show, pick, export, prune and measure recorded model versions",
            description="list, show, pick, export, prune and measure recorded model versions",
        )
    )
    analytics.configure(
        commands.add_parser(
            "analytics",
            help="label histogram, feature statistics and quantiles over all workers' data, without moving it",
            description="statistics over all workers' data, without moving it",
        )
    )
    # Listed for --help; each parses its own arguments (above), as it reads its own --config.
    commands.add_parser("serve", help="the job service: keep dial-in workers connected and run jobs from a queue")
    commands.add_parser("admin", help="the console of a running federation service: workers, jobs, logs, models")
    args = parser.parse_args(argv)
    run = {"provision": provision.run, "models": models.run, "analytics": analytics.run}[args.command]
    try:
        return run(args)
    except BrokenPipeError:
        return stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
