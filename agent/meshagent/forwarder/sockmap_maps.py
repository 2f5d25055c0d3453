"""The sockmap path's maps, by fd: the sockhash, the peer of each socket,
and the X/Y counters of the ordered hand-off (see forwarder/sockmap.py)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from meshagent.bpf import abi
from meshagent.bpf.ringbuf import RingBuf

BPF_EXIST = 2  # update only an entry that is there

if TYPE_CHECKING:
    from meshagent.forwarder.sockmap_side import Side


class SockmapMaps:
    """The four maps of the sockmap path, by fd. X entries are made by the
    verdict on a socket's first segment, Y entries by the first store (a
    missing one reads as 0), so entering the sockhash is one syscall.
    Entries of finished connections are deleted in batches (cookies are
    never reused, so a late delete cannot hit a live connection)."""

    FLUSH_AT = 256

    def __init__(self, loaded, budget: int = 4 << 20) -> None:
        self.sockhash = loaded.map(abi.SOCKHASH)
        self.peer = loaded.map(abi.PEER)
        self.passed = loaded.map(abi.PASSED)
        self.sent = loaded.map(abi.SENT)
        self.msg_tgt = loaded.map(abi.MSG_TGT)
        self.reply = loaded.map(abi.REPLY)
        self.rarm = loaded.map(abi.RARM)
        self.redir = loaded.map(abi.REDIR)
        self.flight = loaded.map(abi.FLIGHT)
        self.seq = loaded.map(abi.SEQ)
        self.budget = budget
        # Reads that went past X: bytes the verdict never saw (open under [L]:
        # a suspect for the rare out-of-place block after a hold-back).
        self.bypasses = 0
        # The hand-off's order checks that failed, by kind (sockmap_relay's
        # _check_order): each one a block that may reach the peer out of place.
        self.disorders: dict[str, int] = {}
        self.wake_fd = loaded.map(abi.WAKE).fd  # mesh_wake: throttled sockets
        # Python's mmap holds a dup of the fd: closed with the maps.
        self._wake = RingBuf(self.wake_fd)
        loaded.on_close(self._wake.close)
        # Cookie -> the spliced pair's Side the verdict budgets (for mesh_wake).
        self.watched: dict[int, Side] = {}
        self.state = loaded.map(abi.STATE)
        self._loaded = loaded
        self.doomed: list[int] = []
        # Y entries exist only where Python stored one: a short connection
        # never does, and a batch delete costs a syscall per missing key.
        self.doomed_y: list[int] = []
        self.doomed_b: list[int] = []  # sockets with a B (and maybe an R)
        # Sockets this forwarder put into the sockhash and has not yet
        # forgotten (each is closed before it is forgotten, and a closed
        # socket leaves the sockhash). The kernel cannot count a sockhash
        # without a walk of one syscall per entry, which a scrape must not
        # do (test_metrics checks this count against that walk).
        self.entered = 0

    def insert(self, sock: socket.socket, cookie: int) -> None:
        """Put the socket into the sockhash. Raises OSError (EOPNOTSUPP when
        the socket is no longer ESTABLISHED)."""
        # Read only with recv() so far: the verdict's count of its TCP
        # sequence starts at its copied_seq (bpf/skb_verdict.c, mesh_fresh).
        self.seq.update_u64(cookie, abi.SEQ_COPIED)
        try:
            self.sockhash.update_u64(cookie, sock.fileno())
        except OSError:
            self.seq.delete_u64(cookie)
            raise
        self.entered += 1

    def set_peers(self, a: int, b: int) -> None:
        for attempt in (1, 2):
            try:
                self.peer.update_u64(a, b)
                self.peer.update_u64(b, a)
                return
            except OSError:
                self.peer.delete_u64(a)
                if attempt == 2:
                    raise
                self.flush()  # finished connections' entries make room

    def set_msg(self, accepted: int, upstream: int, app_key: bytes, app: int) -> None:
        """The sk_msg path for one connection: the pod's socket `app` sends
        straight to `upstream` once Python caught up (the accepted socket's
        Y); replies are spliced from upstream to the accepted socket as
        usual. The accepted socket gets no peer: what reaches it, Python
        carries (a verdict redirect would be queued to a worker, and A's
        direct sends could overtake it)."""
        self.msg_tgt.update(app_key, abi.MSG_TGT_VALUE.pack(upstream, accepted, app))
        for attempt in (1, 2):
            try:
                self.peer.update_u64(upstream, accepted)
                return
            except OSError:
                if attempt == 2:
                    raise
                self.flush()

    def set_reply(self, upstream: socket.socket, app: int) -> bytes | None:
        """Name the pod's socket `app` as where the server's replies on this
        upstream socket may go straight (maps.h, mesh_reply): only if sock_ops
        made the entry (the server's end is a socket of this node, under the
        attach point). The entry's key, or None."""
        try:
            local, remote = upstream.getsockname(), upstream.getpeername()
        except OSError:
            return None
        key = abi.PAIR.pack(abi.to_addr16(remote[0]), abi.to_addr16(local[0]), remote[1],
                            local[1], 0)  # fmt: skip
        try:
            # Unarmed, and V's stream seen as 0: a server that sent first
            # gets no reply that way until its next send reports its stream.
            self.rarm.update(abi.U64.pack(app), abi.RARM_VALUE.pack(abi.RARM_OFF, 0, 0))
            self.reply.update(key, abi.REPLY_VALUE.pack(app, 0), BPF_EXIST)
        except OSError:
            self.rarm.delete(abi.U64.pack(app))
            return None  # no entry: the server is elsewhere (or a map is full)
        return key

    def reply_ingress(self, key: bytes, app: int = 0, forget: bool = False) -> int:
        """Bytes of the server's replies that went straight into the pod's
        socket; forget: the entries go too (the connection ended)."""
        raw = self.reply.lookup(key)
        if forget:
            self.reply.delete(key)
            self.rarm.delete(abi.U64.pack(app))
        return abi.REPLY_VALUE.unpack(raw)[1] if raw else 0

    def msg_on(self, on: bool) -> None:
        """Whether sock_ops puts pods' new sockets into mesh_apphash."""
        self.state.update(abi.U32.pack(abi.STATE_MSG_ON), abi.U64.pack(1 if on else 0))

    def x(self, cookie: int) -> int:
        return self.passed.lookup_u64(cookie) or 0

    def redirected(self, cookie: int) -> int:
        """R: bytes the verdict redirected from this socket."""
        return self.redir.lookup_u64(cookie) or 0

    def start_budget(self, cookie: int, base: int) -> None:
        """R = 0 and B, before the socket has a peer (no redirect can race
        the R store): the verdict budgets its redirects from now on. Raises
        OSError when a map is full."""
        self.redir.update_u64(cookie, 0)
        self.store_base(cookie, base)

    def store_base(self, cookie: int, base: int) -> None:
        """B grows by what Python sent the peer (stored before a Y)."""
        self.flight.update_u64(cookie, base % (1 << 64))

    def clear_base(self, cookie: int) -> None:
        for table in (self.flight, self.redir):
            table.delete_u64(cookie)

    def store_y(self, cookie: int, y: int) -> None:
        self.sent.update_u64(cookie, y)

    def clear_y(self, cookie: int) -> None:
        self.sent.delete_u64(cookie)

    def forget(self, cookie: int, y_stored: bool = False, budgeted: bool = False) -> None:
        """y_stored: a Y entry was stored for this socket (store_y);
        budgeted: a B (store_base)."""
        self.entered -= 1
        self.doomed.append(cookie)
        if y_stored:
            self.doomed_y.append(cookie)
        if budgeted:
            self.doomed_b.append(cookie)
        if len(self.doomed) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Delete the entries of finished connections, one batch per map."""
        if not self.doomed:
            return
        doomed, self.doomed = self.doomed, []
        doomed_y, self.doomed_y = self.doomed_y, []
        doomed_b, self.doomed_b = self.doomed_b, []
        for table in (self.peer, self.passed, self.seq):
            table.delete_many_u64(doomed)
        if doomed_y:
            self.sent.delete_many_u64(doomed_y)
        if doomed_b:
            self.flight.delete_many_u64(doomed_b)
            self.redir.delete_many_u64(doomed_b)

    def woken(self) -> list[int]:
        """Cookies the verdict named in mesh_wake since the last call."""
        return [int.from_bytes(rec[:8], "little") for rec in self._wake.read()]

    def overlaps_lost(self) -> int:
        """The verdict's overlap_lost counter (all CPUs): a socket's segment
        began with bytes already delivered and they could not be cut off."""
        return self._loaded.metric("overlap_lost")

    def lost(self, cookie: int) -> bool:
        """Did the verdict drop a segment of this socket's stream (its old
        bytes could not be cut off)? Its connection must be reset."""
        return bool((self.seq.lookup_u64(cookie) or 0) & abi.SEQ_LOST)

    def redirect_failures(self) -> int:
        """The verdict's redirect_failed and wake_lost counters (all CPUs):
        either means a claim may wait that nobody told Python about."""
        return self._loaded.metric("redirect_failed") + self._loaded.metric("wake_lost")
