"""Watching a run: a progress bar (or plain lines) and TensorBoard scalars.

Both are listeners of the coordinator's metrics events (the same objects
``--metrics-out`` writes), so the JSON lines stay the one source of truth.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

from .exceptions import ConfigError

__all__ = ["EVAL_SCALARS", "GLOBAL_MODELS", "Progress", "TensorBoardWriter"]

#: The global model's names in eval events: a federated run's, and a centralized baseline's.
GLOBAL_MODELS: Final = ("federated", "centralized")


#: The numeric figures of an eval event (README, "Metrics format") that TensorBoard plots, each under its name.
EVAL_SCALARS: Final = (
    "accuracy",
    "loss",
    "balanced_accuracy",
    "f1_macro",
    "auc",
    "pr_auc",
    "sensitivity",
    "specificity",
    "mse",
    "rmse",
    "mae",
    "r2",
)


class Progress:
    """A tqdm bar over rounds on a terminal; one plain line per round otherwise.

    The bar shows the round, the global model's last accuracy and the seconds
    per round. ``report`` prints other lines without breaking the bar. In
    asynchronous mode (``unit="version"``) a line names the updates each
    global version was made of and how stale each was.
    """

    def __init__(
        self, total_rounds: int, *, enabled: bool = True, stream: IO[str] | None = None, unit: str = "round"
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.total = total_rounds
        self.accuracy: float | None = None
        self.model = GLOBAL_MODELS[0]  # the name of the model whose accuracy is shown
        self.bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_rounds, unit=unit, file=self.stream, dynamic_ncols=True)

    def report(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "eval" and event.get("model") in GLOBAL_MODELS and "accuracy" in event:
            self.model, self.accuracy = str(event["model"]), float(event["accuracy"])  # a regression has none
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix(None), refresh=True)
        if event.get("event") != "round":
            return
        round_number, seconds = int(event["round"]), float(event["seconds"])
        if self.bar is None:
            accuracy = "" if self.accuracy is None else f", last {self.model} accuracy {self.accuracy:.2%}"
            dropped = f", dropped {', '.join(event['failed'])}" if event.get("failed") else ""
            done = f"done in {seconds:.2f} s{accuracy}{dropped}"
            if event.get("mode") == "async":
                self.report(f"Version {round_number}/{self.total}: {_updates(event)}; {done}")
            else:
                self.report(f"Round {round_number}/{self.total} {done}")
            return
        self.bar.n = round_number  # also right after a resume
        self.bar.set_postfix_str(self._postfix(seconds), refresh=True)

    def _postfix(self, seconds: float | None) -> str:
        parts = []
        if self.accuracy is not None:
            parts.append(f"{self.model} accuracy {self.accuracy:.2%}")
        if seconds is not None:
            parts.append(f"{seconds:.2f} s/round")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _updates(event: Mapping[str, Any]) -> str:
    """An asynchronous version's updates, as folded in: "bob (staleness 0), alice (staleness 2)", and how many
    were discarded as too stale."""
    updates = ", ".join(f"{update['worker']} (staleness {update['staleness']})" for update in event["updates"])
    discarded = int(event.get("discarded", 0))
    return updates + (f", {discarded} discarded as too stale" if discarded else "")


class TensorBoardWriter:
    """Writes the run's scalars for TensorBoard: per model its accuracy, loss and the task's metrics
    (:data:`EVAL_SCALARS` that the eval event has: auc, mae, ...), training loss per worker (their mean
    only under ``--secure-agg``), seconds and bytes per round.

    Raises:
        ConfigError: if the ``tensorboard`` package is not installed.
    """

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'syncfed[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind, step = event.get("event"), event.get("round")
        if kind == "round":
            self.writer.add_scalar("round/seconds", event["seconds"], step)
            self.writer.add_scalar("round/bytes_moved", event["bytes_sent"] + event["bytes_received"], step)
            self.writer.add_scalar("round/workers", len(event["workers"]), step)
            for worker, loss in event.get("train_loss", {}).items():
                self.writer.add_scalar(f"train_loss/{worker}", loss, step)
            if "train_loss_mean" in event:
                self.writer.add_scalar("train_loss/mean", event["train_loss_mean"], step)
        elif kind == "eval":
            for name in EVAL_SCALARS:
                value = event.get(name)
                if isinstance(value, (int, float)):  # absent where the task has no such figure; None if undefined
                    self.writer.add_scalar(f"{name}/{event['model']}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
