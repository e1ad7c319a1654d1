"""``run_websocket_server.py``: start a worker that serves its private shard.

Usage::

    python run_websocket_server.py --id alice --port 8777
    python run_websocket_server.py --id testing --port 8780 --testing
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

from ..config import DEFAULT_MAX_MESSAGE_SIZE, WorkerConfig
from ..datasets import DATASETS
from ..exceptions import ConfigError, SyncfedError
from ..partition import group_label, parse_classes
from ..worker import load_shard, run_worker
from .common import INTERRUPTED, fail, parse_arguments, setup_logging, size

__all__ = ["main", "build_parser"]

PROGRAM = "run_websocket_server.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Run a syncfed worker that trains and evaluates on its private data. "
        "Flags may be written with dashes or underscores.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="read settings from this TOML file (flags win)")
    parser.add_argument("--id", help="worker id, e.g. alice, bob, charlie or testing (required)")
    parser.add_argument("--host", default="localhost", help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8777, help="port to bind, 0 for a free one (default: %(default)s)")
    parser.add_argument(
        "--testing", action="store_true", help="hold the test set and serve as the evaluator (implied by --id testing)"
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="data set (default: %(default)s)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where MNIST/raw lives (default: %(default)s)"
    )
    parser.add_argument(
        "--digits",
        help="classes this worker holds, e.g. 0,5,9 or 0-3"
        " (default: by id: alice 0-3, bob 4-6, charlie 7-9; all for the evaluator)",
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="MODULE:ATTR", help="also allow this user model (repeatable)"
    )
    parser.add_argument("--cuda", action="store_true", help="train on the GPU when one is available")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-download", action="store_true", help="never download MNIST")
    parser.add_argument(
        "--max-message-size",
        type=size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest message accepted, in bytes or with a unit such as 512MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=8, help="concurrent requests per connection (default: %(default)s)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="concurrent connections; more are refused (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sleep this long per training batch, to drill slow sites (default: %(default)s)",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve wss:// with this certificate")
    security.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key")
    security.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="require coordinators to present a certificate this CA signed"
    )
    security.add_argument(
        "--allow-coordinator",
        action="append",
        default=[],
        metavar="NAME",
        help="let in only coordinators whose certificate has this common name (repeatable)",
    )
    security.add_argument(
        "--auth-token-file", type=Path, metavar="FILE", help="require coordinators to prove they know this token"
    )
    parser.add_argument("--verbose", action="store_true", help="log every message")
    return parser


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    testing = args.testing or args.id == "testing"
    return WorkerConfig(
        worker_id=args.id,
        host=args.host,
        port=args.port,
        testing=testing,
        dataset=args.dataset,
        data_dir=args.data_dir,
        digits=parse_classes(args.digits) if args.digits else None,
        models=tuple(args.model),
        cuda=args.cuda,
        threads=args.threads,
        download=not args.no_download,
        max_message_size=args.max_message_size,
        max_in_flight=args.max_in_flight,
        max_connections=args.max_connections,
        batch_delay=args.batch_delay,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        allow_coordinators=tuple(args.allow_coordinator),
        auth_token_file=args.auth_token_file,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return fail(PROGRAM, exc)
    if args.id is None:
        parser.error("the following arguments are required: --id (or id in --config)")
    setup_logging(args.verbose, default=20)
    try:
        config = config_from_args(args)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        data = load_shard(config)
        if len(data) == 0:
            raise ConfigError(f"worker {config.worker_id} holds no examples of digits {args.digits}")
        counts = ", ".join(f"{label}: {count}" for label, count in enumerate(data.histogram()) if count)
        held = group_label([label for label, count in enumerate(data.histogram()) if count])
        role = "test" if config.testing else "training"
        print(
            f"{config.worker_id} holds {len(data)} {role} examples of {data.name}, digits {held} ({counts})", flush=True
        )
        asyncio.run(run_worker(config, data, ready=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print(f"{PROGRAM}: stopped", file=sys.stderr)
        return INTERRUPTED
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except OSError as exc:  # the port is taken, the host does not resolve
        print(f"{PROGRAM}: error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
