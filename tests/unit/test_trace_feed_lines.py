"""A slow tracer loses whole events, never half a line: every line it reads
parses as JSON (a short send used to cut a line and corrupt the stream)."""

import json
import socket

from meshagent.trace_feed import Tracer


def _drain(sock, into):
    while True:
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        into += chunk


def test_slow_reader_gets_only_whole_lines():
    agent, reader = socket.socketpair()
    agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tracer = Tracer(agent, None, 0)
    received = bytearray()
    sent = 300
    for n in range(sent):
        tracer.event({"pod": "p", "n": n, "pad": "x" * (200 + 397 * (n % 40))})
        if n % 9 == 0:
            _drain(reader, received)
    flush = getattr(tracer, "flush", lambda: None)
    for _ in range(100):  # bounded: the buffer empties in a few rounds
        flush()
        _drain(reader, received)
    agent.close()
    while _drain(reader, received):
        pass
    reader.close()
    assert received.endswith(b"\n")
    lines = bytes(received).split(b"\n")[:-1]
    events = [json.loads(line) for line in lines]
    numbers = [e["n"] for e in events]
    assert numbers == sorted(set(numbers))
    assert tracer.dropped > 0  # the reader was slow: some were dropped...
    assert len(events) + tracer.dropped == sent  # ...whole, and counted


def test_filters_still_apply():
    agent, reader = socket.socketpair()
    tracer = Tracer(agent, "p", 80)
    tracer.event({"pod": "q", "orig_dst": "10.0.0.1:80"})
    tracer.event({"pod": "p", "orig_dst": "10.0.0.1:81"})
    tracer.event({"pod": "p", "orig_dst": "10.0.0.1:80"})
    agent.close()
    data = reader.recv(65536)
    reader.close()
    assert [json.loads(line)["orig_dst"] for line in data.splitlines()] == ["10.0.0.1:80"]


def test_the_loop_sends_the_rest_without_a_new_event():
    import select

    from meshagent.host.loop import Loop

    agent, reader = socket.socketpair()
    agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    loop = Loop()
    tracer = Tracer(agent, None, 0, loop)
    for n in range(20):
        tracer.event({"pod": "p", "n": n, "pad": "y" * 3000})
    assert tracer.pending  # the reader has not read: the rest waits
    received = bytearray()
    loop.add(reader.fileno(), select.EPOLLIN, lambda _ev: _drain(reader, received))

    def check():
        if tracer.pending:
            loop.call_later(0.01, check)
        else:
            loop.stop()

    loop.call_later(0.01, check)
    guard = loop.call_later(30, loop.stop)  # bounded, never a timing assertion
    loop.run()
    guard.cancel()
    loop.remove(reader.fileno())
    loop.close()
    agent.close()
    while _drain(reader, received):
        pass
    reader.close()
    assert not tracer.pending
    events = [json.loads(line) for line in bytes(received).split(b"\n")[:-1]]
    assert [e["n"] for e in events] == list(range(20))
    assert tracer.dropped == 0
