"""The epoll loop (host/loop.py) with real fds."""

from __future__ import annotations

import os
import socket

from meshagent.host.loop import Loop


def test_an_event_of_a_closed_fd_never_reaches_the_socket_that_reuses_its_number():
    """Two sockets hang up in one batch. The first handler called closes
    the other and a new socket takes its fd number (as accept() does under
    load): the batch's event for the old socket must not reach the new
    one's handler (it used to: a new connection was reset as "reset by
    peer", about 1 run in 20 of the 200-connection test under load)."""
    loop = Loop()
    pairs = [socket.socketpair() for _ in range(2)]
    mine = [a for a, _b in pairs]
    for _a, b in pairs:
        b.close()  # both of ours hang up: readable (EOF) at once
    called: list[str] = []
    fresh: list[socket.socket] = []

    def old(which: int):
        def handle(_events: int) -> None:
            called.append(f"old{which}")
            other = mine[1 - which]
            if fresh or other.fileno() < 0:
                return
            number = other.fileno()
            loop.remove(number)
            other.close()
            ends = socket.socketpair()  # quiet: nothing to read
            fresh.extend(ends)
            if number not in (ends[0].fileno(), ends[1].fileno()):  # the lowest free fd
                os.dup2(ends[0].fileno(), number)
                fresh.append(socket.socket(fileno=number))
            loop.add(number, 1, lambda _ev: called.append("new"))  # EPOLLIN

        return handle

    for i, sock in enumerate(mine):
        loop.add(sock.fileno(), 1, old(i))
    loop.call_later(0.2, loop.stop)
    loop.run()
    assert "new" not in called, called
    assert len([c for c in called if c.startswith("old")]) >= 1
    for sock in mine + fresh:
        sock.close()
    loop.close()


def test_a_forgotten_fd_leaves_the_epoll_set_when_closed():
    """Loop.forget drops an fd without EPOLL_CTL_DEL: closing it (its only
    fd) must take it out of the epoll set, so the number it frees can be
    registered again and its new file's events arrive. If the old file
    were still registered, epoll.register would fail with EEXIST."""
    loop = Loop()
    a, b = socket.socketpair()
    loop.add(a.fileno(), 1, lambda _ev: None)  # EPOLLIN
    number = a.fileno()
    loop.forget(number)
    a.close()
    b.close()
    c, d = socket.socketpair()
    if c.fileno() != number:  # take the freed number, as accept() would
        os.dup2(c.fileno(), number)
        c.close()
        c = socket.socket(fileno=number)
    called: list[int] = []
    loop.add(number, 1, called.append)
    d.send(b"x")
    loop.call_later(0.2, loop.stop)
    loop.run()
    assert called, "the new file's event never arrived"
    for sock in (c, d):
        sock.close()
    loop.close()
