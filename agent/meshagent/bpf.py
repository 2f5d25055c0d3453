"""The BPF loader: render the C, compile with BCC, load, attach as links,
and typed access to the maps.

BCC's rewriter only handles the main file, so the sources are rendered into
one text with our own quoted includes expanded in place; `render_source()`
is exactly what is compiled (`meshagent run --dump-bpf` prints it).
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshagent import bpfsys, kernel, names
from meshagent.addrs import from_addr16, to_addr16
from meshagent.config import AgentConfig, bpf_cflags, cidr_lpm_key
from meshagent.errors import MeshError

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')

# struct mesh_pod {u32 pod_id; u16 port; u16 flags}
POD_FMT = "=IHH"
# struct mesh_orig {addr[16]; u16 port; u16 pad; u32 pod_id; u64 netns}
ORIG_FMT = "=16sHHIQ"
ORIG_SIZE = struct.calcsize(ORIG_FMT)
# struct mesh_tuple {u64 netns; addr[16]; u16 port; u16 pad1; u32 pad2}
TUPLE_FMT = "=Q16sHHI"


def bpf_dir() -> Path:
    """bpf/ sources: inside the installed package, else the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parent.parent / "bpf"):
        if (candidate / "include" / "maps.h").exists():
            return candidate
    raise MeshError("BPF sources not found (expected meshagent/bpf or bpf/ in the source tree)")


def render_source(files: tuple[str, ...] = tuple(names.PROGRAM_FILES.values())) -> str:
    """The single C text BCC compiles: the entry files with our headers inlined."""
    root = bpf_dir()
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        path = path.resolve()
        if path in seen:
            return []
        seen.add(path)
        rel = path.relative_to(root)
        out = [f'#line 1 "{rel}"']
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = _INCLUDE_RE.match(line)
            if match:
                out.extend(expand(path.parent / match.group(1)))
                out.append(f'#line {number + 1} "{rel}"')
            else:
                out.append(line)
        return out

    lines: list[str] = []
    for name in files:
        lines.extend(expand(root / name))
    return "\n".join(lines) + "\n"


@dataclass
class Datapath:
    """Loaded programs attached to one cgroup; owns the BCC object and links."""

    bpf: Any
    cgroup: Path
    links: dict[str, int] = field(default_factory=dict)
    sockmap_error: str | None = None  # why the sockmap data path is unavailable
    getpeername_error: str | None = None  # why getpeername shows the listener
    _stack: ExitStack = field(default_factory=ExitStack)
    _fds: dict[str, bpfsys.MapFd] = field(default_factory=dict)

    # -- attach / detach ---------------------------------------------------
    def attach(self) -> None:
        """The redirect hooks, as BPF links at the cgroup; the getpeername
        hooks too where the kernel has them (5.8+), else noted."""
        from bcc import BPF

        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._stack.callback(os.close, cgroup_fd)
        sock_addr = BPF.CGROUP_SOCK_ADDR
        try:
            self._link(names.PROG_CONNECT4, sock_addr, bpfsys.BPF_CGROUP_INET4_CONNECT, cgroup_fd)
            self._link(names.PROG_CONNECT6, sock_addr, bpfsys.BPF_CGROUP_INET6_CONNECT, cgroup_fd)
            self._link(names.PROG_SOCKOPS, BPF.SOCK_OPS, bpfsys.BPF_CGROUP_SOCK_OPS, cgroup_fd)
        except BaseException:
            self.close()
            raise
        try:
            for prog, attach_type in (
                (names.PROG_GETPEER4, bpfsys.BPF_CGROUP_INET4_GETPEERNAME),
                (names.PROG_GETPEER6, bpfsys.BPF_CGROUP_INET6_GETPEERNAME),
            ):
                self._link(prog, sock_addr, attach_type, cgroup_fd)
        except MeshError as exc:
            self.getpeername_error = str(exc)

    def _link(self, prog: str, prog_type: int, attach_type: int, cgroup_fd: int) -> None:
        fn = _load(self.bpf, prog, prog_type, attach_type)
        try:
            link = bpfsys.link_create(fn.fd, cgroup_fd, attach_type)
        except OSError as exc:
            raise MeshError(
                f"cannot attach {prog} at cgroup {self.cgroup}: {exc.strerror}"
                " (BPF links need kernel 5.7+; try --redirect iptables)"
            ) from None
        self.links[prog] = link
        self._stack.callback(self._unlink, prog)

    def attach_verdict(self) -> None:
        """Attach the sk_skb stream verdict to the sockhash. A failure only
        makes the sockmap data path unavailable (recorded, not raised)."""
        from bcc import BPF

        try:
            fn = self.bpf.load_func(names.PROG_VERDICT.encode(), BPF.SK_SKB)
            bpfsys.prog_attach(
                fn.fd, self.map_fd(names.MAP_SOCKHASH).fd, bpfsys.BPF_SK_SKB_STREAM_VERDICT
            )
        except Exception as exc:
            self.sockmap_error = f"sk_skb verdict: {exc}"

    def map_fd(self, name: str) -> bpfsys.MapFd:
        """A map by raw fd (also the ones BCC 0.26 has no table class for)."""
        if name not in self._fds:
            from bcc.libbcc import lib

            fd = lib.bpf_table_fd(self.bpf.module, name.encode())
            if fd < 0:
                raise MeshError(f"map {name} not found in the loaded programs")
            lib.bpf_table_key_size.restype = ctypes.c_size_t
            lib.bpf_table_key_size.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            key_size = lib.bpf_table_key_size(self.bpf.module, name.encode())
            self._fds[name] = bpfsys.MapFd(fd, name, key_size)
        return self._fds[name]

    def _unlink(self, prog: str) -> None:
        link = self.links.pop(prog, None)
        if link is None:
            return
        try:
            bpfsys.link_detach(link)
        except OSError:
            pass
        os.close(link)

    def close(self) -> None:
        """Detach every program and free the BPF object; safe to call twice."""
        self._stack.close()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # -- maps --------------------------------------------------------------
    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def set_pod(self, netns_cookie: int, pod_id: int, port: int) -> None:
        _update(
            self.table(names.MAP_PODS),
            struct.pack("=Q", netns_cookie),
            struct.pack(POD_FMT, pod_id, port, 0),
        )

    def del_pod(self, netns_cookie: int) -> None:
        _delete(self.table(names.MAP_PODS), struct.pack("=Q", netns_cookie))

    def pods(self) -> dict[int, tuple[int, int]]:
        out = {}
        for key, value in self.table(names.MAP_PODS).items():
            pod_id, port, _ = struct.unpack(POD_FMT, bytes(value))
            out[key.value] = (pod_id, port)
        return out

    def lookup_orig(
        self, netns_cookie: int, client_ip: str, client_port: int
    ) -> tuple[str, int] | None:
        """The original destination of a steered connection, by its client end."""
        key = struct.pack(TUPLE_FMT, netns_cookie, to_addr16(client_ip), client_port, 0, 0)
        raw = self.map_fd(names.MAP_ORIG_TUP).lookup_bytes(key, ORIG_SIZE)
        if raw is None:
            return None
        addr, port, _, _, _ = struct.unpack(ORIG_FMT, raw)
        return from_addr16(addr), port

    def set_excludes(self, ports: tuple[int, ...], cidrs: tuple[str, ...]) -> None:
        port_table = self.table(names.MAP_EXCL_PORT)
        for port in ports:
            _update(port_table, struct.pack("=H", port), b"\x01")
        cidr_table = self.table(names.MAP_EXCL_CIDR)
        for cidr in cidrs:
            prefixlen, addr = cidr_lpm_key(cidr)
            _update(cidr_table, struct.pack("=I16s", prefixlen, addr), b"\x01")

    def metric(self, reason: str, direction: str = "egress") -> int:
        """One decision counter, summed over CPUs."""
        idx = names.REASONS.index(reason) * len(names.DIRECTIONS)
        idx += names.DIRECTIONS.index(direction)
        return sum(self.table(names.MAP_METRICS)[ctypes.c_int(idx)])

    def metrics(self) -> dict[str, dict[str, int]]:
        """{reason: {direction: count}} summed over CPUs; zeros left out."""
        out: dict[str, dict[str, int]] = {}
        for reason in names.REASONS:
            for direction in names.DIRECTIONS:
                total = self.metric(reason, direction)
                if total:
                    out.setdefault(reason, {})[direction] = total
        return out

    def live_connections(self) -> int:
        return self.table(names.MAP_STATE)[ctypes.c_int(names.STATE_TUP_LIVE)].value


def _load(bpf: Any, prog: str, prog_type: int, attach_type: int) -> Any:
    try:
        if prog_type == bpf.CGROUP_SOCK_ADDR:
            return bpf.load_func(prog.encode(), prog_type, attach_type=attach_type)
        return bpf.load_func(prog.encode(), prog_type)
    except Exception as exc:
        raise MeshError(
            f"the kernel refused {prog} ({names.PROGRAM_FILES[prog]}): {exc};"
            " (kernel too old for this hook? see `meshagent probe-kernel`)"
        ) from None


def _buf(table: Any, attr: str, raw: bytes) -> Any:
    ctype = getattr(table, attr)
    if ctypes.sizeof(ctype) != len(raw):
        raise MeshError(f"map {table.name}: {attr} is {ctypes.sizeof(ctype)} bytes, not {len(raw)}")
    return ctype.from_buffer_copy(raw)


def _update(table: Any, key: bytes, value: bytes) -> None:
    table[_buf(table, "Key", key)] = _buf(table, "Leaf", value)


def _delete(table: Any, key: bytes) -> None:
    try:
        del table[_buf(table, "Key", key)]
    except KeyError:
        pass


def _lookup(table: Any, key: bytes) -> bytes | None:
    try:
        return bytes(table[_buf(table, "Key", key)])
    except KeyError:
        return None


def load(cfg: AgentConfig, cgroup_path: Path, hooks: bool = True, verdict: bool = True) -> Datapath:
    """Compile the programs with BCC; attach the connect/sock_ops hooks at the
    cgroup (hooks) and the sk_skb verdict to the sockhash (verdict)."""
    kernel.require_headers()
    try:
        from bcc import BPF
    except ImportError:
        raise MeshError(
            "BCC is not installed (Debian package python3-bpfcc): run scripts/bootstrap"
        ) from None
    text = render_source()
    try:
        bpf = BPF(text=text.encode(), cflags=bpf_cflags(cfg))
    except Exception as exc:
        raise MeshError(
            f"BCC could not compile the BPF programs ({exc}); check the kernel headers"
            f" at {kernel.headers_path()} or run scripts/bootstrap"
        ) from None
    datapath = Datapath(bpf=bpf, cgroup=cgroup_path)
    try:
        if hooks:
            datapath.set_excludes(cfg.exclude_ports, cfg.exclude_cidrs)
            datapath.attach()
        if verdict:
            datapath.attach_verdict()
        else:
            datapath.sockmap_error = "not loaded"
    except BaseException:
        datapath.close()
        raise
    return datapath
