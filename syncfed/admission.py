"""Who holds a worker's connection slots: authenticated peers, and a bounded queue of peers still handshaking.

A connection counts against ``max_connections`` only once it has
authenticated, so peers that never prove who they are cannot keep a real
coordinator out. Until then it waits in a queue of at most ``max_pending``
peers; a newcomer to a full queue evicts the oldest one. An attacker who
cannot authenticate can then only delay a coordinator by opening
``max_pending`` connections within the coordinator's own handshake (one round
trip), and a coordinator that lost that race gets in when it reconnects.
Refusing newcomers instead would let the same attacker hold every pending
place forever, reopening each one as it times out.

:class:`IdleClock` says when a connection is closed for going quiet. No I/O
here: the worker closes what these decide, with times it reads itself.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Admission", "IdleClock"]

K = TypeVar("K")


class Admission(Generic[K]):
    """Connection slots of one worker, keyed by whatever identifies a connection."""

    def __init__(self, *, max_connections: int, max_pending: int) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self._pending: dict[K, None] = {}  # insertion order: oldest first
        self._admitted: set[K] = set()

    @property
    def full(self) -> bool:
        """Whether every authenticated slot is taken: a newcomer could not be admitted."""
        return len(self._admitted) >= self.max_connections

    @property
    def counts(self) -> tuple[int, int]:
        """Authenticated and pending connections, for logs."""
        return len(self._admitted), len(self._pending)

    def arrive(self, peer: K) -> K | None:
        """Count ``peer`` as handshaking; return the oldest handshaking peer it evicts when the queue was full."""
        evicted = None
        if len(self._pending) >= self.max_pending:
            evicted = next(iter(self._pending))
            del self._pending[evicted]
        self._pending[peer] = None
        return evicted

    def authenticate(self, peer: K) -> bool:
        """Give ``peer`` an authenticated slot; False, and ``peer`` is forgotten, when none is free.

        A peer that is no longer pending (evicted, or gone) gets no slot either.
        """
        if peer not in self._pending:
            return False
        del self._pending[peer]
        if self.full:
            return False
        self._admitted.add(peer)
        return True

    def admitted(self, peer: K) -> bool:
        return peer in self._admitted

    def leave(self, peer: K) -> None:
        """Free whatever ``peer`` holds; calling it again does nothing."""
        self._pending.pop(peer, None)
        self._admitted.discard(peer)


class IdleClock:
    """When one connection is closed for going quiet, and why.

    Until it authenticates it has ``handshake_timeout`` from its opening. It
    is idle while it has nothing in flight (the caller says so: a request
    being served, an update held for fetching) and no message arriving;
    pings do not count, so a peer that only pings is idle too. ``idle_timeout``
    None or 0 never closes an authenticated connection.
    """

    def __init__(self, now: float, *, handshake_timeout: float, idle_timeout: float | None) -> None:
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout or None
        self.opened = self.active = now
        self.arriving: float | None = None  # when the last fragment of a message still arriving came

    def used(self, now: float) -> None:
        """A request other than ping was served."""
        self.active = now

    def fragment(self, now: float | None) -> None:
        """A fragment of a message arrived; None: the message is whole (or the connection gone)."""
        self.arriving = now

    def deadline(self, now: float, *, authenticated: bool, busy: bool) -> tuple[float, str] | None:
        """When the connection is to be closed unless it is used first, and why; None: never.

        While ``busy`` the idle deadline is one timeout away: the caller looks again then.
        """
        deadlines = []
        if not authenticated:
            deadlines.append((self.opened + self.handshake_timeout, f"no hello within {self.handshake_timeout:g} s"))
        if self.idle_timeout is not None:
            quiet = now if busy else max(self.active, self.arriving or self.active)
            deadlines.append((quiet + self.idle_timeout, f"idle for {self.idle_timeout:g} s"))
        return min(deadlines) if deadlines else None
