"""The round's fold: each worker's update taken in as it arrives, then the next global model.

Every synchronous round ends in a fold, read the same way whichever kind it
is (:class:`Fold`): the contributors' losses and example counts, the updates
kept for the evaluator, and :meth:`Fold.aggregate`. Two kinds exist:

- :class:`StreamingFold`, for plain rounds: a mean-based strategy folds each
  update into running sums and lets it go, so the coordinator holds the sums
  plus the update in flight, whatever the number of workers; a robust one
  keeps them all (it needs every update at once). With ``fragments``, a
  streamed update is folded as its fragments arrive and never held whole
  (:mod:`syncfed.absorption`).
- :class:`PrivateFold`, for secure aggregation and differential privacy: the
  updates were summed under masks (or clipped and noised) before the
  coordinator saw them, so it only holds the round's mean update.

Pure: no I/O. Validation comes before any arithmetic, as in Flower.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

import numpy as np

from .absorption import FragmentRoute
from .aggregation import RunningMean, from_float64
from .exceptions import AggregationError
from .failure import Failure
from .finite import nonfinite
from .masking import unflatten
from .protocol import FitResult
from .strategies import MeanStrategy, Strategy
from .tensors import Weights

__all__ = ["Fold", "PrivateFold", "StreamingFold", "floating", "invalid_header", "invalid_update", "mismatch"]


class Fold(Protocol):
    """What a round's fold tells the round: who contributed, with what, and the next global model."""

    #: Each contributor's training loss, in arrival order.
    losses: dict[str, float]
    #: Each contributor's example count.
    examples: dict[str, int]
    #: Each contributor's relative compression error (empty without --compress).
    compression_errors: dict[str, float]
    #: Each --dp-sgd contributor's own example-level epsilon so far.
    dp_epsilons: dict[str, float]
    #: Each contributor's weights, when the evaluator scores them this round.
    kept: dict[str, Weights]
    #: The example count a secure sum revealed (None when nothing summed the counts).
    total_examples: int | None

    def aggregate(self, num_workers: int) -> Weights:
        """The next global model from what was folded in."""
        ...


class StreamingFold:
    """Takes a round's valid updates as they arrive (see the module docstring).

    ``kept`` holds each update's weights only when the evaluator scores them this round.
    """

    def __init__(
        self,
        strategy: Strategy,
        reference: Weights,
        *,
        keep: bool,
        delta: bool,
        held: Mapping[str, int],
        control: Weights | None = None,
        spare: Mapping[str, np.ndarray] | None = None,
        fragments: bool = False,
        whole: Collection[str] = (),
    ) -> None:
        """``held``: each worker's example count as its hello said, the most its updates may weigh;
        ``control``: the server control variate sent with the round (SCAFFOLD), which updates must match;
        ``spare``: a previous fold's :meth:`release`, arrays the running sums may reuse (see :class:`RunningMean`);
        ``fragments``: fold streamed updates from their fragments (:meth:`route`) where the round allows it,
        except those of the workers in ``whole`` (each poisoned an earlier fold: it costs no more retraining)."""
        self.strategy = strategy
        self.streamed = strategy.streamed()
        self.reference = reference
        self.keep = keep
        self.delta = delta  # replies carry updates relative to ``reference``
        self.held = held
        self.mean: RunningMean | None = (
            RunningMean(
                weighted=self.streamed.weighted,
                origin=None if delta else reference,
                spare=spare,
            )
            if self.streamed is not None
            else None
        )
        self.control = control
        self.controls = RunningMean(weighted=False) if control is not None else None
        self.updates: list[tuple[Weights, int]] = []
        self.losses: dict[str, float] = {}
        self.compression_errors: dict[str, float] = {}
        self.dp_epsilons: dict[str, float] = {}
        self.examples: dict[str, int] = {}
        self.kept: dict[str, Weights] = {}
        self.total_examples: int | None = None
        # From fragments only where each update goes into the mean and nowhere else: a plain mean of whole
        # weights (not deltas, not compressed), no control variates, nothing kept for the evaluator.
        self.fragments = fragments and self.mean is not None and not (keep or delta or control is not None)
        self.whole = frozenset(whole)
        self._routes: dict[str, FragmentRoute] = {}

    def route(self, name: str) -> FragmentRoute | None:
        """Where ``name``'s streamed reply may be folded as it arrives; None when this fold takes whole ones.

        Close the route when the request is over (:meth:`FragmentRoute.close`).
        """
        if not self.fragments or self.mean is None or name in self.whole:
            return None
        held, reference = self.held.get(name, 0), self.reference  # not self: a cycle would keep old folds alive
        route = self._routes[name] = FragmentRoute(
            self.mean, lambda num_examples, like: invalid_header(num_examples, like, reference, held)
        )
        return route

    @property
    def poisoned(self) -> list[str]:
        """The workers whose reply left part of itself in the sums without counting (see :mod:`syncfed.absorption`):
        the mean is wrong, and the round must be folded again from whole updates."""
        return [name for name, route in self._routes.items() if route.poisoned]

    def add(self, name: str, reply: FitResult) -> Failure | None:
        """Fold in ``name``'s ``reply``; why it is invalid, if it is (then nothing is folded)."""
        route = self._routes.get(name)
        sink = None if route is None else route.sink
        if sink is not None and sink.reply is reply:  # its weights went into the sums as they arrived
            if sink.failure is not None:
                return Failure("invalid update", sink.failure)
            sink.commit()
            self._note(name, reply)
            return None
        reason = invalid_update(reply, self.reference, self.held.get(name, 0))
        if reason is None and self.control is not None:
            reason = (
                "no control variate update (SCAFFOLD)"
                if reply.control_delta is None
                else mismatch(reply.control_delta, self.control) or nonfinite(reply.control_delta)
            )
        if reason is not None:
            return Failure("invalid update", reason)
        weights = (
            {tensor: self.reference[tensor] + array for tensor, array in reply.weights.items()}
            if self.delta and (self.mean is None or self.keep)
            else reply.weights
        )
        if self.mean is not None:
            self.mean.add(reply.weights, reply.num_examples)
        else:
            self.updates.append((weights, reply.num_examples))
        if self.controls is not None and reply.control_delta is not None:
            self.controls.add(reply.control_delta, 1)
        if self.keep:
            self.kept[name] = weights
        self._note(name, reply)
        return None

    def _note(self, name: str, reply: FitResult) -> None:
        """Record a folded reply's figures."""
        self.losses[name] = reply.loss
        self.compression_errors[name] = reply.compression_error
        if reply.dp_epsilon is not None:
            self.dp_epsilons[name] = reply.dp_epsilon
        self.examples[name] = reply.num_examples

    def release(self) -> dict[str, np.ndarray]:
        """The running sums' arrays, for the next round's fold to reuse (``spare``); call after :meth:`aggregate`."""
        return self.mean.release() if self.mean is not None else {}

    def aggregate(self, num_workers: int) -> Weights:
        """The next global model: the strategy's step from the running mean, or its rule over every update."""
        if self.mean is None or self.streamed is None:
            return self.strategy.aggregate(self.reference, self.updates, num_workers=num_workers)
        mean = self.mean.result()
        if self.delta:
            mean = {name: self.reference[name] + array for name, array in mean.items()}
        return self.streamed.step(
            self.reference,
            mean,
            control_mean=self.controls.result() if self.controls is not None else None,
            participants=self.mean.count,
            num_workers=num_workers,
        )


class PrivateFold:
    """A private round's outcome (see the module docstring).

    ``kept`` is always empty: individual updates stay private, so the
    evaluator scores the federated model only.
    """

    def __init__(
        self,
        strategy: MeanStrategy,
        reference: Weights,
        mean: np.ndarray | None,
        losses: Mapping[str, float],
        examples: Mapping[str, int],
        total_examples: int | None = None,
    ) -> None:
        """``mean``: the round's mean update of the float tensors, flat (see :func:`~syncfed.masking.flatten`);
        ``total_examples``: the example count the secure sum revealed, when it summed counts."""
        self.strategy = strategy
        self.reference = reference
        self.mean = mean
        self.losses = dict(losses)
        self.examples = dict(examples)
        self.total_examples = total_examples
        # Empty: private rounds refuse --compress, which would garble a masked update or unclip a clipped one.
        self.compression_errors: dict[str, float] = {}
        # Empty: a worker's own epsilon would tell its sampling rate, hence its size.
        self.dp_epsilons: dict[str, float] = {}
        self.kept: dict[str, Weights] = {}

    def aggregate(self, num_workers: int) -> Weights:
        """The next global model: the strategy's step from the global model and the mean update.

        Raises:
            AggregationError: if no worker contributed.
        """
        if self.mean is None:
            raise AggregationError("no updates to aggregate")
        # Zero-stride float64 templates: the update is added to the weights in float64, as RunningMean does.
        like = {name: np.broadcast_to(np.zeros(()), array.shape) for name, array in floating(self.reference).items()}
        delta = unflatten(self.mean, like)
        mean = {
            name: from_float64(array + delta[name], array.dtype) if name in delta else array
            for name, array in self.reference.items()
        }
        return self.strategy.step(self.reference, mean, participants=len(self.losses), num_workers=num_workers)


def floating(weights: Mapping[str, np.ndarray]) -> Weights:
    """The floating-point tensors of ``weights``: the ones a private round carries."""
    return {name: array for name, array in weights.items() if np.issubdtype(array.dtype, np.floating)}


def mismatch(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """How a worker's weights differ from the global model's names, shapes and dtypes, if they do."""
    if update.keys() != reference.keys():
        return f"tensors {sorted(set(update) ^ set(reference))[:5]} do not match the model's"
    for name, array in reference.items():
        if update[name].shape != array.shape or update[name].dtype != array.dtype:
            got, expected = f"{update[name].dtype}{list(update[name].shape)}", f"{array.dtype}{list(array.shape)}"
            return f"tensor {name} is {got}, the model's is {expected}"
    return None


def invalid_header(
    num_examples: int, weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], held: int
) -> str | None:
    """Why an update cannot be aggregated, read before its values: more examples than its worker said it
    holds (which would outweigh the others), or tensors unlike the model's (only shapes and dtypes are read)."""
    if num_examples > held:
        return f"num_examples {num_examples} exceeds the {held} examples the worker's hello claimed"
    return mismatch(weights, reference)


def invalid_update(reply: FitResult, reference: Mapping[str, np.ndarray], held: int) -> str | None:
    """Why an update cannot be aggregated: :func:`invalid_header`, or a non-finite value (after decompression)."""
    return invalid_header(reply.num_examples, reply.weights, reference, held) or nonfinite(reply.weights)
