"""Folding a streamed update into the round's running sums as its fragments arrive.

Decoded whole, each worker's reply costs a buffer the size of the model,
and the coordinator's peak holds one per receive slot beside the global
model and the float64 sums. Folded fragment by fragment (a :class:`FragmentSink`
the decoder writes into, see :class:`~syncfed.protocol.MessageDecoder`), an
update never exists whole: the peak is the global model and the sums,
however many workers reply at once.

The header is read and checked first: the reply's fields, its example count
against the worker's hello, its tensors against the global model. A reply
that fails those is read to its end and dropped without touching the sums.
Then each fragment is checked for non-finite values before it is added. The
price is what happens after that: a reply that breaks off, turns non-finite
in a later fragment, or is abandoned (late, cancelled) has left part of
itself in the sums, and float sums cannot be taken back bit for bit. The
sink then stays *started* but never *committed*: the fold is poisoned and
the round must be folded again from whole updates
(:meth:`syncfed.fold.StreamingFold.poisoned`).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .aggregation import RunningMean
from .exceptions import RemoteProtocolError
from .finite import nonfinite
from .protocol import FitResult, Opened
from .tensors import DTYPES

__all__ = ["FragmentRoute", "FragmentSink"]

#: Why the tensors of a reply's header cannot be folded, given its example count and their layout (zero-stride).
HeaderCheck = Callable[[int, Mapping[str, np.ndarray]], str | None]


class FragmentSink:
    """One reply's tensors, folded into a :class:`RunningMean` as the decoder hands over their bytes.

    ``failure``, when set before any byte (the header was invalid), makes the
    sink drop every byte; set later (a non-finite fragment), it stops the fold
    part way, and the sums are poisoned.
    """

    def __init__(
        self, mean: RunningMean, reply: FitResult, like: Mapping[str, np.ndarray], failure: str | None
    ) -> None:
        self.mean = mean
        #: The reply's fields, its ``weights`` empty: they went into the sums.
        self.reply = reply
        self.failure = failure
        #: Some of the reply's values are in the sums.
        self.started = False
        #: The reply counts in the mean (:meth:`commit`).
        self.committed = False
        self._names = list(like)
        self._dtypes = [array.dtype for array in like.values()]
        self._total = sum(array.size for array in like.values())
        self._folded = 0  # elements in the sums so far
        self._factor = mean.factor(reply.num_examples)
        self._scratch: np.ndarray | None = None
        self._closed = False
        self._index = 0  # the tensor being written
        self._element = 0  # its elements folded so far
        self._carry = b""  # the bytes of an element split across two fragments

    def write(self, index: int, data: memoryview) -> None:
        """Fold the next bytes of tensor ``index``, the elements they complete; never raises."""
        if self.failure is not None or self._closed:
            return
        if index != self._index:
            self._index, self._element, self._carry = index, 0, b""
        dtype = self._dtypes[index]
        if self._carry:
            need = dtype.itemsize - len(self._carry)
            head, data = self._carry + bytes(data[:need]), data[need:]
            self._carry = b""
            if len(head) < dtype.itemsize:
                self._carry = head
                return
            self._fold(index, np.frombuffer(head, dtype=dtype))
        whole = len(data) - len(data) % dtype.itemsize
        if whole:
            self._fold(index, np.frombuffer(data[:whole], dtype=dtype))
        self._carry = bytes(data[whole:])

    def _fold(self, index: int, values: np.ndarray) -> None:
        if self.failure is not None:
            return
        name = self._names[index]
        # Until a byte is in the sums, a non-finite fragment is refused whole and the fold stays
        # clean. Afterwards add_part checks each block in cache, cheaper than a scan beforehand:
        # a failure there stops the fold part way, which poisons it as any later failure would.
        reason = None if self.started else nonfinite({name: values})
        if reason is None:
            if self._scratch is None:
                self._scratch = self.mean.scratch()
            added = self.mean.add_part(name, self._element, values, self._factor, self._scratch, finite=True)
            self.started = True
            if added < values.size:  # (or, in a float64 model, values too near its range for the check)
                reason = nonfinite({name: values[added:]}) or f"tensor {name} holds values near float64's range"
        if reason is not None:
            self.failure = f"{reason} among elements {self._element} to {self._element + values.size - 1}"
            return
        self._element += values.size
        self._folded += values.size
        if self._folded == self._total:
            self._scratch = None  # a round's finished sinks live as long as its fold: 1 MiB each

    @property
    def complete(self) -> bool:
        """Every value of every tensor is in the sums."""
        return self.failure is None and self._folded == self._total and not self._carry

    def message(self) -> FitResult:
        """The reply, its weights folded (:class:`~syncfed.protocol.Sink`)."""
        return self.reply

    def commit(self) -> None:
        """Count the reply in the mean; it must be :attr:`complete`."""
        if not self.complete:
            raise AssertionError("only a complete reply is counted")  # the decoder finished it: every byte came
        self.mean.count_in(self.reply.num_examples)
        self.committed = True

    def close(self) -> None:
        """Take no more bytes: a reply abandoned (late, cancelled) must not reach the sums afterwards."""
        self._closed = True
        self._scratch = None


class FragmentRoute:
    """Offers one worker's reply to the fold: a :class:`FragmentSink` for a streamed ``fit_result``
    whose header the fold can take (a :data:`~syncfed.protocol.Route`)."""

    def __init__(self, mean: RunningMean, check: HeaderCheck) -> None:
        self.mean = mean
        self.check = check
        #: The sink the reply went to, if it came streamed and plain.
        self.sink: FragmentSink | None = None
        self._closed = False

    def __call__(self, opened: Opened, entries: Sequence[dict[str, Any]]) -> FragmentSink | None:
        """A sink for ``opened``, or None to decode it whole (any other message, or a body the decoder refuses)."""
        if self.sink is not None or self._closed or opened.kind != "fit_result":
            return None
        body = opened.body
        weights = body.get("weights")
        if not isinstance(weights, dict) or not _plain(body, weights, entries):
            return None  # compressed, or tensors outside the weights: decoded whole, as before
        try:
            reply = Opened(opened.id, opened.kind, {**body, "weights": {}}).build().message
        except RemoteProtocolError:
            return None  # the decoder finds the same fault in the whole message and reports it
        assert isinstance(reply, FitResult)
        try:  # zero-stride arrays: the layout the header declares (checked), holding no memory
            like = {
                name: np.broadcast_to(np.zeros((), dtype=DTYPES[entry["dtype"]]), tuple(entry["shape"]))
                for name, entry in weights.items()
            }
        except (ValueError, OverflowError):  # sizes numpy cannot index
            return None
        failure = self.check(reply.num_examples, like)
        if failure is None:
            self.mean.start(like)
        self.sink = FragmentSink(self.mean, reply, like, failure)
        return self.sink

    def close(self) -> None:
        """The request is over: its sink takes no more bytes."""
        self._closed = True
        if self.sink is not None:
            self.sink.close()

    @property
    def poisoned(self) -> bool:
        """Part of a reply is in the sums and it does not count."""
        return self.sink is not None and self.sink.started and not self.sink.committed


def _plain(body: dict[str, Any], weights: dict[Any, Any], entries: Sequence[dict[str, Any]]) -> bool:
    """Exactly the weights' tensors carry bytes, in the weights' order, under string names, none compressed."""
    return (
        "control_delta" not in body
        and len(weights) == len(entries)
        and all(isinstance(name, str) for name in weights)
        and all(entry is weights[key] and "encoding" not in entry for key, entry in zip(weights, entries, strict=True))
    )
