"""``run_websocket_client.py``: the coordinator of a federated training run.

Usage::

    python run_websocket_client.py                   # workers already running
    python run_websocket_client.py --spawn-workers   # start them locally, run, stop them
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..aggregation import AGGREGATORS
from ..config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EVALUATOR,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RECONNECT_MAX_DELAY,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_ROUND_TIMEOUT,
    DEFAULT_WORKERS,
    CoordinatorConfig,
    parse_endpoints,
)
from ..coordinator import FEDERATED, Coordinator, RunResult
from ..datasets import DATASETS, ensure_mnist
from ..exceptions import SyncfedError
from ..spawn import spawn_workers
from .common import INTERRUPTED, fail, normalize_flags, setup_logging, size

__all__ = ["main", "build_parser"]

PROGRAM = "run_websocket_client.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Run federated training over syncfed workers. Flags may be written with dashes or underscores.",
    )
    recipe = parser.add_argument_group("training")
    recipe.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    recipe.add_argument("--test-batch-size", type=int, default=128, help="evaluation batch size (default: %(default)s)")
    recipe.add_argument("--training-rounds", type=int, default=40, help="federated rounds (default: %(default)s)")
    recipe.add_argument(
        "--federate-after-n-batches", type=int, default=10, help="local batches per round (default: %(default)s)"
    )
    recipe.add_argument("--lr", type=float, default=0.1, help="learning rate (default: %(default)s)")
    recipe.add_argument(
        "--lr-decay", type=float, default=0.98, help="learning-rate decay per round, floor 0.001 (default: %(default)s)"
    )
    recipe.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the initial model and the workers' shuffling (default: %(default)s)",
    )
    recipe.add_argument(
        "--aggregation",
        choices=list(AGGREGATORS),
        default="fedavg",
        help="fedavg: weighted by examples; mean: unweighted (default: %(default)s)",
    )
    recipe.add_argument(
        "--model",
        help="registry name (mnist-cnn, digits-cnn) or import path mypkg.models:Net"
        " (default: follows the workers' data set)",
    )
    recipe.add_argument(
        "--eval-every", type=int, default=10, help="evaluate at rounds 1, 1+N, ... and the last (default: %(default)s)"
    )
    recipe.add_argument("--cuda", action="store_true", help="with --spawn-workers, let the workers train on the GPU")

    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "--workers", default=DEFAULT_WORKERS, help="training workers as id=uri,... (default: %(default)s)"
    )
    workers.add_argument(
        "--evaluator", default=DEFAULT_EVALUATOR, help="the evaluator as id=uri, empty for none (default: %(default)s)"
    )
    workers.add_argument(
        "--spawn-workers",
        action="store_true",
        help="start the workers as local processes on free ports, and stop them at the end",
    )
    workers.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="with --spawn-workers: the workers' data set (default: %(default)s)",
    )
    workers.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="with --spawn-workers: where MNIST/raw lives (default: %(default)s)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--save-model", type=Path, metavar="PATH", help="save the final federated model as safetensors")
    output.add_argument(
        "--metrics-out", type=Path, metavar="PATH", help="write one JSON object per round and per evaluated model"
    )
    output.add_argument("--verbose", action="store_true", help="log rounds, requests and the spawned workers' output")

    reliability = parser.add_argument_group("reliability")
    reliability.add_argument(
        "--round-timeout",
        type=float,
        default=DEFAULT_ROUND_TIMEOUT,
        help="seconds a round waits for training replies; later ones are dropped (default: %(default)s)",
    )
    reliability.add_argument(
        "--min-workers", type=int, help="quorum: training workers a round needs to count (default: all of them)"
    )
    reliability.add_argument(
        "--max-round-retries",
        type=int,
        default=3,
        help="retries of a round below the quorum before the run stops (default: %(default)s)",
    )
    reliability.add_argument(
        "--ping-interval",
        type=float,
        default=DEFAULT_PING_INTERVAL,
        help="seconds between liveness pings to each worker (default: %(default)s)",
    )
    reliability.add_argument(
        "--ping-timeout",
        type=float,
        default=DEFAULT_PING_TIMEOUT,
        help="a worker that misses pings this long is dropped as frozen or gone (default: %(default)s)",
    )
    reliability.add_argument(
        "--reconnect-max-delay",
        type=float,
        default=DEFAULT_RECONNECT_MAX_DELAY,
        help="cap of the exponential backoff between reconnection attempts (default: %(default)s)",
    )
    reliability.add_argument(
        "--checkpoint-dir", type=Path, metavar="DIR", help="write a checkpoint here after every completed round"
    )
    reliability.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir with its next round"
    )

    limits = parser.add_argument_group("limits and timeouts")
    limits.add_argument(
        "--max-message-size",
        type=size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest reply accepted (default: %(default)s bytes)",
    )
    limits.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to connect and greet each worker (default: %(default)s)",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds to wait for an evaluation reply (default: %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace, workers: dict[str, str], evaluator: dict[str, str]) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers=workers,
        evaluator=evaluator,
        model=args.model,
        training_rounds=args.training_rounds,
        federate_after_n_batches=args.federate_after_n_batches,
        batch_size=args.batch_size,
        test_batch_size=args.test_batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        seed=args.seed,
        aggregation=args.aggregation,
        eval_every=args.eval_every,
        save_model=args.save_model,
        metrics_out=args.metrics_out,
        max_message_size=args.max_message_size,
        connect_timeout=args.connect_timeout,
        request_timeout=args.request_timeout,
        round_timeout=args.round_timeout,
        min_workers=args.min_workers,
        max_round_retries=args.max_round_retries,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        reconnect_max_delay=args.reconnect_max_delay,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
    )


async def _run(args: argparse.Namespace) -> RunResult:
    workers = parse_endpoints(args.workers)
    evaluator = parse_endpoints(args.evaluator)
    config_from_args(args, workers, evaluator)  # validate before starting anything
    if not args.spawn_workers:
        return await Coordinator(config_from_args(args, workers, evaluator)).run()
    if args.dataset == "mnist":
        ensure_mnist(args.data_dir)  # once, rather than four workers downloading at the same time
    common = ["--dataset", args.dataset, "--data-dir", str(args.data_dir), "--threads", "1"]
    if args.cuda:
        common.append("--cuda")
    if args.model and ":" in args.model:
        common += ["--model", args.model]
    plan = [(name, common) for name in workers] + [(name, [*common, "--testing"]) for name in evaluator]
    async with spawn_workers(plan) as processes:
        spawned = {name: processes[name].uri for name in workers}
        spawned_evaluator = {name: processes[name].uri for name in evaluator}
        return await Coordinator(config_from_args(args, spawned, spawned_evaluator)).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(normalize_flags(sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbose, default=30)
    try:
        result = asyncio.run(_run(args))
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    final = [record for record in result.evaluations if record.model == FEDERATED]
    if final:
        last = final[-1]
        print(f"Final federated accuracy at round {last.round}: {last.result.accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
