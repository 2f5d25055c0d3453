"""The sockmap path's maps, by fd: the sockhash, the peer of each socket,
and the X/Y counters of the ordered hand-off (see forwarder/sockmap.py)."""

from __future__ import annotations

import socket

from meshagent.bpf import abi


class SockmapMaps:
    """The four maps of the sockmap path, by fd. X entries are made by the
    verdict on a socket's first segment, Y entries by the first store (a
    missing one reads as 0), so entering the sockhash is one syscall.
    Entries of finished connections are deleted in batches (cookies are
    never reused, so a late delete cannot hit a live connection)."""

    FLUSH_AT = 256

    def __init__(self, loaded) -> None:
        self.sockhash = loaded.map(abi.SOCKHASH)
        self.peer = loaded.map(abi.PEER)
        self.passed = loaded.map(abi.PASSED)
        self.sent = loaded.map(abi.SENT)
        self.msg_tgt = loaded.map(abi.MSG_TGT)
        self.state = loaded.map(abi.STATE)
        self._loaded = loaded
        self.doomed: list[int] = []
        # Y entries exist only where Python stored one: a short connection
        # never does, and a batch delete costs a syscall per missing key.
        self.doomed_y: list[int] = []
        # Sockets this forwarder put into the sockhash and has not yet
        # forgotten (each is closed before it is forgotten, and a closed
        # socket leaves the sockhash). The kernel cannot count a sockhash
        # without a walk of one syscall per entry, which a scrape must not
        # do (test_metrics checks this count against that walk).
        self.entered = 0

    def insert(self, sock: socket.socket, cookie: int) -> None:
        """Put the socket into the sockhash. Raises OSError (EOPNOTSUPP when
        the socket is no longer ESTABLISHED)."""
        self.sockhash.update_u64(cookie, sock.fileno())
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

    def msg_on(self, on: bool) -> None:
        """Whether sock_ops puts pods' new sockets into mesh_apphash."""
        self.state.update(abi.U32.pack(abi.STATE_MSG_ON), abi.U64.pack(1 if on else 0))

    def x(self, cookie: int) -> int:
        return self.passed.lookup_u64(cookie) or 0

    def store_y(self, cookie: int, y: int) -> None:
        self.sent.update_u64(cookie, y)

    def clear_y(self, cookie: int) -> None:
        self.sent.delete_u64(cookie)

    def forget(self, cookie: int, y_stored: bool = False) -> None:
        """y_stored: a Y entry was stored for this socket (store_y)."""
        self.entered -= 1
        self.doomed.append(cookie)
        if y_stored:
            self.doomed_y.append(cookie)
        if len(self.doomed) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Delete the entries of finished connections, one batch per map."""
        if not self.doomed:
            return
        doomed, self.doomed = self.doomed, []
        doomed_y, self.doomed_y = self.doomed_y, []
        for table in (self.peer, self.passed):
            table.delete_many_u64(doomed)
        if doomed_y:
            self.sent.delete_many_u64(doomed_y)

    def redirect_failures(self) -> int:
        """The verdict's redirect_failed counter (all CPUs)."""
        return self._loaded.metric("redirect_failed")
