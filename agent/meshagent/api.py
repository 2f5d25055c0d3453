"""What a control request and its reply are, apart from how they travel.

A handler takes a `Request` and returns a `Reply` (data, and optionally
fds to pass with it and what to do when the client's connection closes)
or a `Deferred` one, for work that runs off the loop. The domain modules
build replies with these types; only the control server (control.py)
knows the socket and the wire format.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

from meshagent.errors import MeshError
from meshagent.modes import parse, values

if TYPE_CHECKING:
    from meshagent.host.peer import Peer

E = TypeVar("E", bound=Enum)


class Request:
    """One decoded request, with typed access that fails as one line."""

    def __init__(
        self, data: dict, conn: socket.socket | None = None, peer: Peer | None = None
    ) -> None:
        self.data = data
        self.conn = conn  # for a reply that streams (trace)
        self.peer = peer  # who asks (host/peer.py), checked by the server before the handler

    def op(self) -> str:
        return self.text("op")

    def _bad(self, key: str, what: str) -> MeshError:
        return MeshError(f"{self.data.get('op', 'request')}: {key!r} must be {what}")

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self._bad(key, "a non-empty string")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.text(key)

    def optional_int(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, "an integer")
        return value

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def choice(self, key: str, enum: type[E], optional: bool = False) -> E | None:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._bad(key, f"one of {', '.join(values(enum))}")
        return parse(enum, value, f"{self.data.get('op')}: {key!r}")


@dataclass
class Reply:
    """A successful answer: its data; fds passed with it (SCM_RIGHTS, the
    server closes its copies once sent); on_close, called when the client's
    connection closes (a reply that streams, such as trace's)."""

    data: dict = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    on_close: Callable[[], None] | None = None


@dataclass
class Failure:
    """A failed request: the exception and the op it failed in."""

    error: BaseException
    op: object = ""


Outcome = Reply | Failure


class Deferred:
    """A reply that comes later, for work that runs off the loop: a handler
    returns one, and resolve() or fail() (on the loop) settles it. Until
    then the connection's further requests wait, so replies keep the order
    of their requests."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self._then: Callable[[Outcome], None] | None = None

    def resolve(self, reply: Reply | dict) -> None:
        self._settle(reply if isinstance(reply, Reply) else Reply(reply))

    def fail(self, exc: BaseException, op: str = "") -> None:
        self._settle(Failure(exc, op))

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._then is not None:
            self._then(outcome)

    def then(self, fn: Callable[[Outcome], None]) -> None:
        self._then = fn
        if self.outcome is not None:
            fn(self.outcome)


Handler = Callable[[Request], "Reply | Deferred"]


def reply_of(result: dict | Deferred) -> Reply | Deferred:
    """A domain call's result (a dict now, or a Deferred) as a handler's reply."""
    return result if isinstance(result, Deferred) else Reply(result)
