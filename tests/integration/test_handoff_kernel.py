"""The copy-to-sockmap move against the real verdict in the running kernel,
without pods: the forwarder's own SockmapPath on loopback sockets.

The kernel fact behind it (measured on 6.18): when a socket enters a
sockhash with a stream verdict, segments still queued pass through the
verdict whole (tcp_read_skb), also one that recv() has already read part
of. The part Python read and sent on would then be redirected a second
time. So a move happens only when each socket's last read was short: it
ate every segment it touched, and whatever is queued since is whole."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

MB = 1024 * 1024
DEADLINE = 30.0
SO_RCVBUFFORCE = 33


TIGHT = 16 * 1024  # a back-pressure budget every transfer here crosses many times


@pytest.fixture(params=["budget", "tight"])
def sockmap_path(mesh_env, request):
    """The real verdict attached to a fresh sockhash, and the forwarder's
    SockmapPath (copy first) on a loop of its own; "tight": with a 16 KiB
    back-pressure budget, so the kernel holds bytes back again and again."""
    from meshagent.bpf import loader
    from meshagent.bpf.programs import PROGRAMS_BY_NAME
    from meshagent.config import AgentConfig
    from meshagent.forwarder import build_paths
    from meshagent.forwarder.sockmap_maps import SockmapMaps
    from meshagent.host.loop import Loop
    from meshagent.modes import DataPathMode

    cfg = AgentConfig(state_dir=mesh_env.state_dir)
    if request.param == "tight":
        cfg = AgentConfig(state_dir=mesh_env.state_dir, sockmap_budget=TIGHT)
    maps, fds, refused = loader.load_programs(cfg, (PROGRAMS_BY_NAME["mesh_verdict"],))
    assert not refused, refused
    loaded = loader.attach(fds, maps, mesh_env.cgroup_path)
    loop = Loop()
    try:
        maps = SockmapMaps(loaded, cfg.sockmap_budget)
        path = build_paths(loop, (DataPathMode.SOCKMAP,), maps)[DataPathMode.SOCKMAP]
        yield path, loaded
    finally:
        loop.close()
        loaded.close()


def _receive(sock: socket.socket, want: int, out: dict, key: str) -> None:
    """Read until want bytes came, then until EOF (more is a duplicate)."""
    digest, got = hashlib.sha256(), 0
    sock.settimeout(DEADLINE)
    try:
        while chunk := sock.recv(1 << 16):
            if got < want:
                digest.update(chunk[: want - got])
            got += len(chunk)
    except OSError as exc:
        out[key + "_error"] = str(exc)
    out[key] = (got, digest.hexdigest())


@pytest.mark.parametrize("readers", ["reading", "late"])
def test_a_move_while_a_segment_is_half_read_keeps_every_byte_once(
    sockmap_path, readers, monkeypatch
):
    """4 MiB queued each way before the relay starts, 1 MiB more after
    the move: the copy phase's 256 KiB reads fill up and end inside a
    segment. The pair must still
    move to the sockmap (after reading to a segment boundary), and each end
    must get exactly what the other sent, once. With late readers the
    forwarder still holds bytes at the move: they go first, and the kernel
    redirects nothing before them."""
    from meshagent.forwarder.sockmap import SockmapRelay

    path, loaded = sockmap_path
    readers_mode = readers
    held: list[int] = []
    start = SockmapRelay.start

    def noting_start(relay) -> None:
        held.extend((len(relay.client.pending), len(relay.upstream.pending)))
        start(relay)

    monkeypatch.setattr(SockmapRelay, "start", noting_start)
    up_data, down_data = os.urandom(5 * MB), os.urandom(5 * MB)
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    socks = [front, back]
    # Deep receive queues (as autotuning grows them in a long transfer):
    # more than one 256 KiB read waits, so a read ends inside a segment.
    front.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * MB)
    if readers_mode == "late":  # shallow buffers toward the ends: sends block
        front.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # fwd_client's
        back.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # app_server's
    result: dict = {}
    try:
        app_client = socket.socket()
        if readers_mode == "late":
            app_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        app_client.connect(front.getsockname())
        fwd_client, _ = front.accept()
        fwd_up = socket.socket()
        fwd_up.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * MB)
        if readers_mode == "late":
            fwd_up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        fwd_up.connect(back.getsockname())
        app_server, _ = back.accept()
        socks += [app_client, fwd_client, fwd_up, app_server]
        fwd_client.setblocking(False)
        fwd_up.setblocking(False)

        def send(sock: socket.socket, data: bytes, moved: threading.Event) -> None:
            sock.sendall(data[: 4 * MB])
            moved.wait(DEADLINE)  # the rest comes after the move (no FIN before it)
            sock.sendall(data[4 * MB :])
            sock.shutdown(socket.SHUT_WR)

        release = threading.Event()
        threads = [
            threading.Thread(target=send, args=(app_client, up_data, release)),
            threading.Thread(target=send, args=(app_server, down_data, release)),
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        time.sleep(0.3)  # let both queues fill: the first reads are full
        readers = [
            threading.Thread(target=_receive, args=(app_server, len(up_data), result, "server")),
            threading.Thread(target=_receive, args=(app_client, len(down_data), result, "client")),
        ]
        for thread in readers:
            thread.daemon = True
        if readers_now := readers_mode == "reading":
            for thread in readers:
                thread.start()
        ended: list = []
        conn = path.join(fwd_client, fwd_up, path.accepted(fwd_client),
                         lambda _c, why: ended.append(why))  # fmt: skip
        deadline = time.monotonic() + DEADLINE
        while not ended and time.monotonic() < deadline:
            if isinstance(conn.inner, SockmapRelay) or conn.closed:
                if not readers_now:
                    for thread in readers:
                        thread.start()
                    readers_now = True
                release.set()
            timer = path.loop.call_later(0.02, path.loop.stop)
            path.loop.run()
            timer.cancel()
            path.tick()
        release.set()
        if not readers_now:
            for thread in readers:
                thread.start()
        for thread in readers:
            thread.join(DEADLINE)
        assert ended == [None], f"the relay did not end cleanly: {ended}"
        assert isinstance(conn.inner, SockmapRelay), "the pair never moved to the sockmap"
        assert result["client"] == (len(down_data), hashlib.sha256(down_data).hexdigest())
        assert result["server"] == (len(up_data), hashlib.sha256(up_data).hexdigest())
        assert loaded.metric("spliced") > 0, "the kernel carried nothing after the move"
        if readers_mode == "late":
            assert any(held), "nothing was held at the move: the test lost its point"
        if path.maps.budget == TIGHT:
            assert loaded.metric("throttled") > 0, "never held back: the test lost its point"
    finally:
        for sock in socks:
            sock.close()


def test_the_start_self_test_moves_after_a_half_read_segment(sockmap_path):
    """`--datapath auto` proves the sockmap path at every start with the same
    case: the server's early bytes fill more than one copy-phase read."""
    from meshagent.forwarder import build_paths, selftest
    from meshagent.forwarder.sockmap_maps import SockmapMaps
    from meshagent.modes import DataPathMode

    path, loaded = sockmap_path
    spliced = loaded.metric("spliced")

    def factory(loop):
        return build_paths(loop, (DataPathMode.SOCKMAP,), SockmapMaps(loaded, path.maps.budget))

    assert selftest.check(DataPathMode.SOCKMAP, factory) is None
    assert loaded.metric("spliced") > spliced, "the self-test never reached the kernel's splice"
    # check() returning None means its writer blocked; by the kernel's hold-back
    # only if that pair's hand-off caught up with the writer first, which it
    # may not (test_backpressure's xfail): so the kernel's count is not asserted
