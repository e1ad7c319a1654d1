"""The rules of one worker connection: everything that affects its state machine lives in this file.

A worker's session is a conversation of requests, each answered by id. The
I/O layer (``syncfed.worker.session``) reads messages and sends replies; it
asks :class:`SessionRules` what each event means and does what it decides.
No I/O here and no clock, so every rule is tested without a socket.

The rules, in the order a request meets them (from its envelope alone,
before its body is built, since building may cost more):

1. Only requests are served: any other kind is ``unknown_kind``.
2. Request id 0 is reserved for errors that cannot be attributed to a
   request: a request that uses it is ``malformed``.
3. Hello comes first: any other request before it is ``out_of_order``. Only
   a hello of this worker's protocol version greets; one of another version
   is answered ``unsupported_version`` and the session is still not greeted.
   Requests pipelined right after a greeting hello are served: it greets as
   soon as it starts, not when it is answered.
4. Ids are unique while in flight: a request reusing one is ``out_of_order``.
   Once answered, an id may be used again.
5. At most ``max_in_flight`` requests are in flight: one more is ``busy``.

Then, for the requests that carry state across the session:

6. Held updates (flow control): a fit whose plan holds its update leaves it
   here under a fresh token, and the coordinator fetches it when it has room.
   One update is held per connection: a newer one drops the older, so a
   coordinator that never fetches costs one update, not one per round. A
   fetch names its token once: a token not held (never issued, fetched
   already, or dropped) is ``out_of_order``.
7. One secure aggregation round per connection: ``secagg_start`` opens it
   (replacing any open one), the other three steps must name its session or
   are ``out_of_order``, and the unmasking step closes it: a client answers
   one unmasking request only.

Refusals are raised as :class:`~syncfed.exceptions.RequestFailed` with the
code and reason the worker sends; the session keeps serving after each.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..exceptions import RequestFailed
from ..secagg import SecAggClient, SecAggConfig
from .base import PROTOCOL_VERSION, Message
from .envelope import REQUESTS
from .messages import Hello
from .training_messages import FitResult

__all__ = ["HeldUpdate", "SecureRound", "SessionRules"]


@dataclass(frozen=True)
class HeldUpdate:
    """A fit's reply held until fetched, with the encoding its plan asked for."""

    token: int
    reply: FitResult
    compression: str


@dataclass(frozen=True)
class SecureRound:
    """The secure aggregation round open on a connection: its settings and this worker's client in it."""

    config: SecAggConfig
    client: SecAggClient


class SessionRules:
    """The state of one connection's conversation, and what each event it sees means."""

    def __init__(self, *, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.greeted = False
        self.in_flight: set[int] = set()
        self.held: HeldUpdate | None = None
        self.secure_round: SecureRound | None = None
        self._tokens = itertools.count(1)

    @property
    def busy(self) -> bool:
        """Whether the connection is in use: a request in flight or an update waiting to be fetched."""
        return bool(self.in_flight) or self.held is not None

    # Requests (rules 1 to 5)

    def check_envelope(self, request_id: int, kind: str) -> None:
        """Refuse a request from its envelope alone, before its body is built.

        Raises:
            RequestFailed: with the first rule it breaks, in the order of the module docstring.
        """
        if kind not in REQUESTS:
            raise RequestFailed("unknown_kind", f"message kind {kind!r} is not a request")
        if request_id == 0:
            raise RequestFailed("malformed", "request id 0 is reserved for unattributable errors")
        if not self.greeted and kind != Hello.kind:
            raise RequestFailed("out_of_order", f"{kind} before hello")
        if request_id in self.in_flight:
            raise RequestFailed("out_of_order", f"request id {request_id} is already in flight")
        if len(self.in_flight) >= self.max_in_flight:
            raise RequestFailed(
                "busy", f"{len(self.in_flight) + 1} requests in flight exceed limit of {self.max_in_flight}"
            )

    def start(self, request_id: int, message: Message) -> None:
        """A request passed :meth:`check_envelope` and was built: it is in flight, and a hello of our version greets."""
        self.in_flight.add(request_id)
        if isinstance(message, Hello) and message.protocol_version == PROTOCOL_VERSION:
            self.greeted = True

    def finish(self, request_id: int) -> None:
        """A request was answered (or abandoned): its id is free again."""
        self.in_flight.discard(request_id)

    @staticmethod
    def check_hello(message: Hello) -> None:
        """Refuse a hello of another protocol version.

        Raises:
            RequestFailed: ``unsupported_version``.
        """
        if message.protocol_version != PROTOCOL_VERSION:
            raise RequestFailed(
                "unsupported_version",
                f"protocol version {message.protocol_version} is not supported (this worker speaks {PROTOCOL_VERSION})",
            )

    # Held updates (rule 6)

    def hold(self, reply: FitResult, compression: str) -> tuple[int, int | None]:
        """Hold ``reply`` under a fresh token; return the token and the token of the update it dropped, if any."""
        dropped = self.held.token if self.held is not None else None
        self.held = HeldUpdate(next(self._tokens), reply, compression)
        return self.held.token, dropped

    def fetch(self, token: int) -> HeldUpdate:
        """Hand over the update held under ``token``; it is no longer held.

        Raises:
            RequestFailed: ``out_of_order`` if no update is held under ``token``.
        """
        held = self.held
        if held is None or held.token != token:
            raise RequestFailed("out_of_order", f"no update is held under token {token}")
        self.held = None
        return held

    # Secure aggregation (rule 7)

    def open_round(self, config: SecAggConfig, client: SecAggClient) -> None:
        """``secagg_start``: the round of ``config.session`` is now this connection's, replacing any other."""
        self.secure_round = SecureRound(config, client)

    def round_for(self, session: bytes) -> SecureRound:
        """The open round a later step names.

        Raises:
            RequestFailed: ``out_of_order`` if no round with this session is open.
        """
        if self.secure_round is None or self.secure_round.config.session != session:
            raise RequestFailed("out_of_order", "no secure aggregation round with this session is open")
        return self.secure_round

    def close_round(self) -> None:
        """The unmasking step was asked: no further step of the round is served."""
        self.secure_round = None
