"""The data paths' state machines without root: real loopback TCP sockets,
the forwarder's own loop, and for sockmap a fake of its maps (the verdict
is modelled as "every byte passed to the socket's own queue", so Python
carries everything and the hand-off, half-close and reset logic is what
runs). Half-close, reset, back-pressure and EAGAIN, for every path."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import struct
import termios
import threading
import time

import pytest

from meshagent.forwarder import build_paths
from meshagent.forwarder.copy import HIGH
from meshagent.forwarder.datapath import Connection
from meshagent.host.loop import Loop
from meshagent.host.sockets import socket_cookie
from meshagent.modes import DataPathMode

DEADLINE = 20.0


Y_CLAIMS_WRONG: list[tuple[int, bool]] = []


@pytest.fixture(autouse=True)
def y_claims_right():
    """SockmapMaps deletes a socket's Y entry only when the relay says it
    stored one: the claim must match what was stored."""
    Y_CLAIMS_WRONG.clear()
    yield
    assert not Y_CLAIMS_WRONG


class FakeMaps:
    """SockmapMaps without a kernel: X = what Python stored as Y plus what
    still waits in the socket's receive queue."""

    def __init__(self) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.y: dict[int, int] = {}
        self.peers: dict[int, int] = {}
        self.forgotten: list[int] = []
        self.peer_map_full = False
        self.refuse = False  # the sockhash refuses sockets (no longer ESTABLISHED)
        self.entered = 0
        # Back-pressure: nothing is redirected here (R stays 0), nothing wakes.
        self.budget = 4 << 20
        self.rcvbuf = 512 << 10  # what SockmapMaps.rcvbuf gives at that budget
        self.bases: dict[int, int] = {}
        self.watched: dict = {}
        self.wake_fd = os.eventfd(0)

    def woken(self) -> list[int]:
        return []

    def redirected(self, cookie: int) -> int:
        return 0

    def start_budget(self, cookie: int, base: int) -> None:
        self.bases[cookie] = base

    def store_base(self, cookie: int, base: int) -> None:
        self.bases[cookie] = base

    def clear_base(self, cookie: int) -> None:
        del self.bases[cookie]

    def insert(self, sock: socket.socket, cookie: int) -> None:
        if self.refuse:
            raise OSError(95, "Operation not supported")
        self.socks[cookie] = sock

    def set_peers(self, a: int, b: int) -> None:
        if self.peer_map_full:
            raise OSError(28, "No space left on device")
        self.peers[a], self.peers[b] = b, a

    def x(self, cookie: int) -> int:
        queued = struct.unpack("i", fcntl.ioctl(self.socks[cookie], termios.FIONREAD, b"\0" * 4))
        return self.y.get(cookie, 0) + queued[0]

    def store_y(self, cookie: int, y: int) -> None:
        self.y[cookie] = y

    def clear_y(self, cookie: int) -> None:
        del self.y[cookie]

    def forget(self, cookie: int, y_stored: bool = False, budgeted: bool = False) -> None:
        self.forgotten.append(cookie)
        if budgeted != (cookie in self.bases):  # likewise for B
            Y_CLAIMS_WRONG.append((cookie, "budget", budgeted))
        if y_stored != (cookie in self.y):  # the relay must know whether it stored Y
            Y_CLAIMS_WRONG.append((cookie, y_stored))

    def flush(self) -> None:
        pass

    def redirect_failures(self) -> int:
        return 0


class Pair:
    """app_client -> [fwd_client | data path | fwd_up] -> app_server."""

    def __init__(
        self, mode: DataPathMode, maps: FakeMaps | None = None, early: bytes = b"",
        copy_first: bool = True,
    ) -> None:  # fmt: skip
        self.loop = Loop()
        self.maps = maps or FakeMaps()
        self.path = build_paths(self.loop, tuple(DataPathMode), self.maps)[mode]
        if mode is DataPathMode.SOCKMAP:
            self.path.copy_first = copy_first
        front = socket.create_server(("127.0.0.1", 0))
        back = socket.create_server(("127.0.0.1", 0))
        self.app_client = socket.create_connection(front.getsockname())
        self.app_client.sendall(early)  # before the accept
        self.fwd_client, _ = front.accept()
        self.fwd_client.setblocking(False)
        self.state = self.path.accepted(self.fwd_client)
        self.fwd_up = socket.create_connection(back.getsockname())
        self.fwd_up.setblocking(False)
        self.app_server, _ = back.accept()
        front.close()
        back.close()
        self.reason: list[str | None] = []
        self.conn = None

    def join(self) -> None:
        self.conn = self.path.join(
            self.fwd_client, self.fwd_up, self.state, lambda _c, why: self.reason.append(why)
        )

    def run_until(self, predicate, what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            timer = self.loop.call_later(0.01, self.loop.stop)
            self.loop.run()
            timer.cancel()

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.finish("test over")
        for sock in (self.app_client, self.app_server, self.fwd_client, self.fwd_up):
            sock.close()
        self.loop.close()


def recv_all(sock: socket.socket, pair: Pair, until_eof: bool = True) -> bytes:
    sock.setblocking(False)
    out = bytearray()

    def done() -> bool:
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            out.extend(chunk)

    pair.run_until(done, "EOF")
    return bytes(out)


@pytest.fixture(params=list(DataPathMode), ids=lambda m: m.value)
def pair(request):
    made = Pair(request.param)
    yield made
    made.close()


def test_bytes_both_ways_written_before_the_join_then_half_close(pair):
    """Both ends speak before the path joins (the hand-off, both ways), then
    each half-closes; every byte arrives in order and the connection ends.
    The early bytes all wait in the sockets' queues before the join (sizes
    that fit them): sockmap's fake carries only what was queued at the hand-off."""
    up, down = os.urandom(60_000), os.urandom(40_000)
    pair.app_client.settimeout(10)
    pair.app_server.settimeout(10)
    pair.app_client.sendall(up)
    pair.app_server.sendall(down)
    pair.join()
    pair.app_client.shutdown(socket.SHUT_WR)
    assert hashlib.sha256(recv_all(pair.app_server, pair)).digest() == hashlib.sha256(up).digest()
    pair.app_server.shutdown(socket.SHUT_WR)
    assert recv_all(pair.app_client, pair) == down
    pair.run_until(lambda: pair.reason, "the connection to finish")
    assert pair.reason == [None]
    assert pair.conn.mode is pair.path.mode
    assert pair.conn.closed_by == "pod"  # the client's FIN came first
    assert (pair.conn.bytes_out, pair.conn.bytes_in) == (len(up), len(down))
    assert pair.path.stats.connections_total == 1 and pair.path.stats.connections_active == 0


def test_a_connection_suspended_for_a_handover_that_failed_carries_on(pair):
    """What a handover does to every connection (export while suspended,
    then resume when the successor failed): nothing is lost or doubled."""
    first, second = os.urandom(30_000), os.urandom(30_000)
    pair.app_client.sendall(first)
    pair.join()
    assert isinstance(pair.conn, Connection)
    pair.run_until(lambda: _readable(pair.app_server), "the first bytes")
    pair.conn.suspend()
    state, fds, blobs = pair.conn.export()
    assert state["kind"] in ("relay", "sockmap") and len(fds) >= 2 and len(blobs) == 2
    pair.app_client.sendall(second)
    pair.conn.resume()
    pair.app_client.shutdown(socket.SHUT_WR)
    assert recv_all(pair.app_server, pair) == first + second
    pair.app_server.shutdown(socket.SHUT_WR)
    pair.run_until(lambda: pair.reason, "the connection to finish")
    assert pair.reason == [None]


def _connection_classes() -> list[type]:
    from meshagent.forwarder.copy import Relay
    from meshagent.forwarder.copy_first import CopiedPair, CopyFirst
    from meshagent.forwarder.sockmap_relay import SockmapRelay

    return [Relay, CopiedPair, CopyFirst, SockmapRelay]


@pytest.mark.parametrize("cls", _connection_classes(), ids=lambda c: c.__name__)
def test_every_connection_class_has_the_whole_protocol(cls):
    members = [name for name in vars(Connection) if not name.startswith("_")]
    assert {"export", "suspend", "resume", "settled"} <= set(members)
    assert [name for name in members if not hasattr(cls, name)] == []


@pytest.mark.parametrize("mode", [DataPathMode.COPY, DataPathMode.SPLICE], ids=str)
def test_the_start_self_test_passes_on_loopback(mode):
    """forwarder/selftest.py on the paths that need no BPF (it raises the
    upstream's receive buffer: root)."""
    if os.geteuid() != 0:
        pytest.skip("SO_RCVBUFFORCE needs CAP_NET_ADMIN")
    from meshagent.forwarder import selftest

    assert selftest.check(mode, lambda loop: build_paths(loop, tuple(DataPathMode), None)) is None


@pytest.mark.parametrize("mode", [DataPathMode.COPY, DataPathMode.SPLICE], ids=str)
def test_after_one_half_close_the_other_direction_still_flows(mode):
    pair = Pair(mode)
    try:
        pair.join()
        pair.app_client.sendall(b"request")
        pair.app_client.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_server, pair) == b"request"
        reply = os.urandom(500_000)
        writer = threading.Thread(target=pair.app_server.sendall, args=(reply,))
        writer.start()
        pair.run_until(lambda: not writer.is_alive(), "the reply to be written")
        pair.app_server.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_client, pair) == reply
        pair.run_until(lambda: pair.reason, "the connection to finish")
        assert pair.reason == [None]
    finally:
        pair.close()


def test_a_reset_on_one_side_resets_the_other(pair):
    pair.app_client.sendall(b"hello")  # before the join: sockmap's fake carries it too
    pair.join()
    pair.run_until(lambda: _readable(pair.app_server), "hello")
    assert pair.app_server.recv(5) == b"hello"
    pair.app_server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.app_server.close()
    pair.run_until(lambda: pair.reason, "the reset to propagate")
    assert pair.reason[0] is not None and "upstream" in pair.reason[0]
    pair.app_client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while pair.app_client.recv(1 << 16):
            pass


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_back_pressure_and_eagain_keep_every_byte(pair):
    """The client fills every buffer before the join (EAGAIN) and the server
    reads nothing at first: the path meets EAGAIN on send, keeps what it
    read, stops reading, and once the server reads everything arrives."""
    pair.app_client.setblocking(False)
    sent = bytearray()
    chunk = os.urandom(1 << 16)
    while len(sent) < 64 << 20:
        try:
            sent += chunk[: pair.app_client.send(chunk)]
        except BlockingIOError:
            break
    pair.join()
    for _ in range(20):  # let the path run into the full receiver
        pair.run_until(lambda: True, "a loop turn")
        timer = pair.loop.call_later(0.01, pair.loop.stop)
        pair.loop.run()
        timer.cancel()
    held = getattr(pair.conn, "out", None)
    if held is not None:  # copy/splice: what waits inside the path is bounded
        assert held.waiting <= HIGH
    assert not pair.reason
    pair.app_client.shutdown(socket.SHUT_WR)
    got = recv_all(pair.app_server, pair)
    assert len(got) == len(sent)
    assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(sent)).digest()


def test_sockmap_falls_back_to_copy_when_the_peer_map_is_full():
    maps = FakeMaps()
    maps.peer_map_full = True
    pair = Pair(DataPathMode.SOCKMAP, maps, copy_first=False)
    try:
        cookies = {socket_cookie(pair.fwd_client), socket_cookie(pair.fwd_up)}
        pair.app_client.sendall(b"x" * 1000)
        pair.join()
        assert pair.conn.mode is DataPathMode.COPY
        assert pair.path.stats.fallbacks == 1 and pair.path.stats.connections_active == 0
        assert set(pair.conn.export()[0]["cookies"]) == cookies  # they go to a successor
        pair.app_client.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_server, pair) == b"x" * 1000
        pair.app_server.shutdown(socket.SHUT_WR)
        pair.run_until(lambda: pair.reason, "the copy to finish")
        assert cookies <= set(maps.forgotten)  # their sockhash entries are dropped
    finally:
        pair.close()


def test_sockmap_copies_a_pair_whose_accepted_socket_the_sockhash_refused():
    maps = FakeMaps()
    maps.refuse = True
    pair = Pair(DataPathMode.SOCKMAP, maps, copy_first=False)
    try:
        pair.join()
        assert pair.conn.mode is DataPathMode.COPY
        assert pair.path.stats.fallbacks == 1 and pair.path.stats.connections_active == 0
        pair.app_client.sendall(b"y" * 1000)
        pair.app_client.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_server, pair) == b"y" * 1000
        pair.app_server.shutdown(socket.SHUT_WR)
        pair.run_until(lambda: pair.reason, "the copy to finish")
        assert pair.reason == [None] and not maps.forgotten  # nothing entered
    finally:
        pair.close()


def half_close_both_and_check_forgotten(pair: Pair, cookies: set[int]) -> None:
    pair.app_client.shutdown(socket.SHUT_WR)
    pair.app_server.shutdown(socket.SHUT_WR)
    pair.run_until(lambda: pair.reason, "both half-closes")
    assert pair.reason == [None]
    assert set(pair.maps.forgotten) == cookies


def test_sockmap_forgets_both_cookies_when_done():
    pair = Pair(DataPathMode.SOCKMAP, copy_first=False)
    try:
        cookies = {socket_cookie(pair.fwd_client), socket_cookie(pair.fwd_up)}
        pair.join()
        assert set(pair.maps.peers) == cookies
        half_close_both_and_check_forgotten(pair, cookies)
    finally:
        pair.close()


def test_sockmap_accepted_says_how_the_pair_goes_on_and_abandon_forgets_what_entered():
    """accepted() answers a typed Accepted: LATER (copy first), SPLICE with
    the accepted socket's cookie, or COPY when the sockhash refused it; the
    pod's own socket goes with it only where sk_msg is on."""
    from meshagent.forwarder.sockmap import Accepted, Start
    from meshagent.steering import AppSocket

    loop, maps = Loop(), FakeMaps()
    path = build_paths(loop, (DataPathMode.SOCKMAP,), maps)[DataPathMode.SOCKMAP]
    app = AppSocket(b"key", 7)
    sock, other = socket.socketpair()
    try:
        cookie = socket_cookie(sock)
        assert path.accepted(sock, app) == Accepted(Start.LATER)
        path.msg = True
        assert path.accepted(sock, app) == Accepted(Start.LATER, app=app)
        path.abandon(Accepted(Start.LATER, app=app))
        path.copy_first = False
        state = path.accepted(sock, app)
        assert state == Accepted(Start.SPLICE, cookie, app)
        assert not maps.forgotten
        path.abandon(state)
        assert maps.forgotten == [cookie]
        maps.refuse = True
        state = path.accepted(sock, app)
        assert state == Accepted(Start.COPY)
        path.abandon(state)
        assert maps.forgotten == [cookie]
    finally:
        sock.close()
        other.close()
        loop.close()


def test_a_spliced_pair_handed_to_a_successor_picks_up_where_it_was():
    """export() of a SockmapRelay and the path's restore() from it, as the
    handover does (the sockets by dup'ed fds): the hand-off's state and
    the cookies go over, and the restored pair ends and forgets both."""
    pair = Pair(DataPathMode.SOCKMAP, copy_first=False)
    try:
        cookies = {socket_cookie(pair.fwd_client), socket_cookie(pair.fwd_up)}
        pair.app_client.sendall(b"a" * 1000)
        pair.join()
        pair.run_until(lambda: _readable(pair.app_server), "the bytes before the handover")
        old = pair.conn
        old.suspend()
        state, fds, blobs = old.export()
        client, upstream = (socket.socket(fileno=os.dup(fd)) for fd in fds[:2])
        ended: list[str | None] = []
        pair.conn = pair.path.restore(client, upstream, state, fds[2:], blobs,
                                      lambda _c, why: ended.append(why))  # fmt: skip
        for side in ("client", "upstream"):
            assert getattr(pair.conn, side).export() == getattr(old, side).export()
        assert pair.maps.entered == 2 and pair.conn in pair.path.relays  # rechecked by tick()
        assert pair.app_server.recv(1000, socket.MSG_WAITALL) == b"a" * 1000
        pair.app_client.shutdown(socket.SHUT_WR)
        pair.app_server.shutdown(socket.SHUT_WR)
        pair.run_until(lambda: ended, "the restored pair to end")
        assert ended == [None] and set(pair.maps.forgotten) == cookies
    finally:
        pair.close()


def test_a_short_sockmap_connection_never_touches_the_maps():
    """One request, one reply: the connection stays on its copy phase."""
    pair = Pair(DataPathMode.SOCKMAP)
    try:
        pair.join()
        pair.app_client.sendall(b"GET key\r\n")
        pair.app_client.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_server, pair) == b"GET key\r\n"
        pair.app_server.sendall(b"$5\r\nvalue\r\n")
        pair.app_server.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_client, pair) == b"$5\r\nvalue\r\n"
        pair.run_until(lambda: pair.reason, "the connection to finish")
        assert pair.reason == [None]
        assert pair.conn.mode is DataPathMode.SOCKMAP
        assert not pair.maps.socks and not pair.maps.peers and not pair.maps.forgotten
    finally:
        pair.close()


def test_a_long_sockmap_connection_moves_from_copy_to_the_sockmap():
    """Many small exchanges: after UPGRADE_READS events the pair enters the
    sockhash between two exchanges (nothing held), and ends like any
    sockmap pair. (The fake has no redirect: what the kernel carries after
    the move is for tests/integration/test_datapaths.py.)"""
    from meshagent.forwarder.sockmap import UPGRADE_READS, SockmapRelay

    pair = Pair(DataPathMode.SOCKMAP)
    try:
        cookies = {socket_cookie(pair.fwd_client), socket_cookie(pair.fwd_up)}
        pair.join()

        def readable(sock: socket.socket) -> bool:
            try:
                return bool(sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                return False

        assert not pair.conn.settled  # on its copy phase
        for i in range(UPGRADE_READS):
            if isinstance(pair.conn.inner, SockmapRelay):
                break
            pair.app_client.sendall(b"ping %d\n" % i)
            pair.run_until(lambda: readable(pair.app_server), "a ping")
            assert pair.app_server.recv(64) == b"ping %d\n" % i
            pair.app_server.sendall(b"pong\n")
            pair.run_until(lambda: readable(pair.app_client), "a pong")
            assert pair.app_client.recv(64) == b"pong\n"
        assert isinstance(pair.conn.inner, SockmapRelay) and pair.conn.settled
        assert set(pair.maps.peers) == cookies
        assert pair.conn.bytes_out == len(b"".join(b"ping %d\n" % n for n in range(i)))
        half_close_both_and_check_forgotten(pair, cookies)
    finally:
        pair.close()


def test_bytes_held_at_the_move_go_first_behind_a_blocked_y(monkeypatch):
    """A server that sends more than the pod reads: the move comes while
    the forwarder still holds bytes for the pod. Until they are sent, the
    upstream's Y is BLOCKED (no redirect could pass them); then it is the
    real Y, or no entry at all (a missing Y reads as 0)."""
    from meshagent.forwarder.sockmap import BLOCKED, SockmapRelay

    at_start: list[tuple[int, int | None]] = []
    start = SockmapRelay.start

    def noting_start(relay) -> None:
        start(relay)
        at_start.append((len(relay.upstream.pending), pair.maps.y.get(relay.upstream.cookie)))

    monkeypatch.setattr(SockmapRelay, "start", noting_start)
    pair = Pair(DataPathMode.SOCKMAP)
    try:
        up = socket_cookie(pair.fwd_up)
        pair.fwd_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pair.app_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        blob = os.urandom(8 << 20)

        def send() -> None:
            with contextlib.suppress(OSError):
                pair.app_server.sendall(blob)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(0.2)  # a queue at the upstream socket before the relay starts
        pair.join()
        pair.run_until(lambda: isinstance(pair.conn.inner, SockmapRelay), "the move")
        relay = pair.conn.inner
        assert at_start and at_start[0][0] > 0, "nothing held at the move: the test lost its point"
        assert at_start[0][1] == BLOCKED
        got = bytearray()
        pair.app_client.setblocking(False)
        pair.fwd_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # now drain

        def held_sent() -> bool:  # the pod reads; the held bytes drain
            with contextlib.suppress(BlockingIOError):
                while chunk := pair.app_client.recv(1 << 20):
                    got.extend(chunk)
            return relay.upstream.sent_y >= 0  # stored once what was held had gone

        # (The fake has no redirect: past this point the kernel carries the
        # rest, which tests/integration/test_handoff_kernel.py checks.)
        pair.run_until(held_sent, "the held bytes at the pod")
        assert got and bytes(got) == blob[: len(got)]  # in order so far
        assert pair.maps.y.get(up, 0) == relay.upstream.sent_y
    finally:
        pair.close()


@pytest.mark.parametrize("mode", list(DataPathMode), ids=str)
def test_a_client_that_writes_before_the_accept_and_a_server_that_speaks_first(mode):
    early, banner, rest = os.urandom(40_000), os.urandom(30_000), os.urandom(100_000)
    pair = Pair(mode, early=early)
    try:
        pair.app_server.sendall(banner)  # before the upstream joins the path
        pair.app_client.sendall(rest)  # (sockmap's fake carries only what came before)
        pair.join()
        pair.app_client.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_server, pair) == early + rest
        pair.app_server.shutdown(socket.SHUT_WR)
        assert recv_all(pair.app_client, pair) == banner
        pair.run_until(lambda: pair.reason, "the connection to finish")
        assert pair.reason == [None]
    finally:
        pair.close()


def test_splice_stops_reading_when_the_pipe_is_full_by_slots():
    """Many small segments fill a pipe by its slots long before its bytes:
    the leg must stop asking to read until its writer drains the pipe
    (it used to keep EPOLLIN armed and spin on EAGAIN)."""
    from meshagent.forwarder.splice import SpliceLeg

    class OneSlot(SpliceLeg):
        PIPE_SIZE = 1 << 20  # what the leg believes; the pipe below has one slot

    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    for sock in (src, dst):
        sock.setblocking(False)
    leg = OneSlot(src, dst)
    fcntl.fcntl(leg.pipe_w, 1031, 4096)  # F_SETPIPE_SZ: one page, one slot
    try:
        while True:  # fill dst so nothing can leave the pipe
            try:
                dst.send(b"\0" * 65536)
            except BlockingIOError:
                break
        src_peer.send(b"a" * 10)
        leg.read()  # the first segment takes the pipe's only slot
        assert leg.queued == 10 and leg.wants_read()
        src_peer.send(b"b" * 10)
        leg.read()  # no room: EAGAIN, and no more reads wanted
        assert leg.queued == 10 and not leg.wants_read()
        with contextlib.suppress(BlockingIOError):
            while dst_peer.recv(1 << 20, socket.MSG_DONTWAIT):  # the reader catches up
                pass
        leg.flush()
        assert leg.queued == 0 and leg.wants_read()
        leg.read()  # reading again moves the waiting segment on
        assert leg.nbytes == 20
    finally:
        leg.close()
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()


class ClaimNeverReadable(FakeMaps):
    """X is always 100 past what Python can read: a claim that never lands."""

    def x(self, cookie: int) -> int:
        return super().x(cookie) + 100


class RedirectedNeverArrives(FakeMaps):
    """The verdict says it redirected bytes from the pod's socket that never
    enter the upstream socket's stream (R + B stays past the stream)."""

    def redirected(self, cookie: int) -> int:
        return 4096 if cookie in self.peers and cookie == self.client else 0


@pytest.mark.parametrize(
    ("maps", "what"),
    [(ClaimNeverReadable, "passed bytes not yet readable"),
     (RedirectedNeverArrives, "redirected bytes never reached the peer's stream")],
)  # fmt: skip
def test_a_stalled_hand_off_says_once_what_it_waits_for(monkeypatch, maps, what):
    """A stall is a defect: its warning names the socket and the counts the
    hand-off rests on (X, Y, R, B, the peer's stream), once per pair."""
    from meshagent.forwarder import sockmap_relay

    monkeypatch.setattr(sockmap_relay, "STALL_SECONDS", 0.2)
    fake = maps()
    # bytes queued before the splice: Python reads and holds them (for the
    # second fake, R says more came first)
    pair = Pair(DataPathMode.SOCKMAP, fake, early=b"b" * 1000, copy_first=False)
    seen: list[str] = []
    pair.path.on_stall = lambda _conn, detail: seen.append(detail)
    try:
        fake.client = pair.state.cookie
        pair.join()
        pair.run_until(lambda: seen, "the stall")
        later = time.monotonic() + 0.5
        pair.run_until(lambda: time.monotonic() > later, "more rechecks")
        assert len(seen) == 1, seen
        assert seen[0].startswith(what), seen
        assert f"pod socket (cookie {fake.client})" in seen[0] and " Y " in seen[0], seen
        assert pair.path.stats.stalls == 1
    finally:
        pair.close()
