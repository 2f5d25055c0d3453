"""The iptables redirect backend: rules inside the pod's netns.

iptables-restore runs inside the pod's network namespace: the calling
thread enters it with setns and the child inherits it (no `ip netns exec`,
no `nsenter`). Which flavour (legacy or nft) is decided once for the host,
as Istio does: whichever already holds rules, else the system default.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.host import netns
from meshagent.modes import Backend, IptablesFlavour, values
from meshagent.redirect.own_cgroup import OwnCgroup
from meshagent.redirect.rules import RuleConfig, parse_state, render_rules, render_teardown
from meshagent.steering import Orig, PodHandle

FLAVOURS = tuple(values(IptablesFlavour))
LOCK_WAIT_SECONDS = 5
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


@dataclass(frozen=True)
class Tools:
    flavour: str
    restore4: str
    restore6: str
    save4: str
    save6: str

    @classmethod
    def of(cls, flavour: str) -> Tools:
        names = {
            "restore4": f"iptables-{flavour}-restore",
            "restore6": f"ip6tables-{flavour}-restore",
            "save4": f"iptables-{flavour}-save",
            "save6": f"ip6tables-{flavour}-save",
        }
        paths = {}
        for key, name in names.items():
            path = shutil.which(name) or next(
                (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None
            )
            if path is None:
                raise MeshError(f"{name} is missing: run scripts/bootstrap (installs iptables)")
            paths[key] = path
        return cls(flavour=flavour, **paths)


def _rule_count(save_binary: str) -> int:
    try:
        out = subprocess.run(
            [save_binary], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("-A"))


def detect_flavour(wanted: str | None = None) -> tuple[str, str]:
    """(flavour, how it was decided)."""
    if wanted:
        if wanted not in FLAVOURS:
            raise MeshError(f"--iptables {wanted!r}: choose legacy or nft")
        Tools.of(wanted)
        return wanted, "asked for"
    counts = {}
    for flavour in FLAVOURS:
        save = shutil.which(f"iptables-{flavour}-save")
        counts[flavour] = _rule_count(save) if save else -1
    if counts["legacy"] < 0 and counts["nft"] < 0:
        raise MeshError("iptables is missing: run scripts/bootstrap (installs iptables)")
    if counts["legacy"] != counts["nft"]:
        flavour = max(counts, key=lambda f: counts[f])
        return flavour, f"the host's rules are in {flavour} ({counts[flavour]} rules)"
    default = Path(shutil.which("iptables") or "/usr/sbin/iptables").resolve().name
    flavour = "legacy" if "legacy" in default else "nft"
    return flavour, f"no rules on the host; the system default iptables is {flavour}"


@dataclass(frozen=True)
class Where:
    """A pod's netns for rule work: the fd the agent holds, else its path."""

    name: str
    fd: int | None = None

    @classmethod
    def of(cls, pod: PodHandle) -> Where:
        return cls(pod.netns_name, pod.netns_fd)


class IptablesBackend:
    name = Backend.IPTABLES
    blocking = True  # iptables-restore in the pod's netns: off the loop

    def __init__(self, cfg: RuleConfig, tools: Tools, own: OwnCgroup | None = None) -> None:
        self.cfg = cfg
        self.tools = tools
        self.own = own  # how to run the tools so they see cfg.skip_cgroup as we do

    @property
    def flavour(self) -> str:
        return self.tools.flavour

    def reconcile(self, pods: list[PodHandle]) -> list[int]:
        """Nothing outside the pods' own netns: a deleted pod's rules went with it."""
        return []

    def keep_stopped(self, pod: PodHandle) -> None:
        """Its rules already RETURN new connections."""

    def _run(self, where: Where, argv: list[str], text: str | None, pod: str) -> str:
        """Run argv inside the pod's netns: the fd the agent holds for an
        attached pod (a path can name a newer netns by now: the pod
        re-created), else the path. The netns is per thread: this thread
        enters it, the child inherits it, and the thread comes back at
        once, even on error (no preexec_fn, unsafe with other threads)."""
        netns_name = where.name
        if where.fd is not None:
            try:
                fd = os.dup(where.fd)
            except OSError as exc:
                raise MeshError(
                    f"pod {pod}: network namespace {netns_name}: {exc.strerror}"
                ) from None
        else:
            try:
                fd = os.open(netns.path(netns_name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise MeshError(f"pod {pod}: network namespace {netns_name} is gone") from None
            except OSError as exc:
                raise MeshError(
                    f"pod {pod}: network namespace {netns_name}: {exc.strerror}"
                ) from None
        try:
            with netns.entered(fd), self._cgroup_ns():
                proc = subprocess.run(
                    argv,
                    input=text,
                    capture_output=True,
                    text=True,
                    timeout=LOCK_WAIT_SECONDS + 20,
                )
        except MeshError as exc:  # setns
            raise MeshError(f"pod {pod}: {netns_name}: {exc}") from None
        except subprocess.TimeoutExpired:
            raise MeshError(f"pod {pod}: {Path(argv[0]).name} did not finish") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise MeshError(f"pod {pod}: cannot run {argv[0]}: {exc}") from None
        finally:
            os.close(fd)
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split())
            if "xtables lock" in err or proc.returncode == 4:
                raise MeshError(
                    f"pod {pod}: the xtables lock was held for more than"
                    f" {LOCK_WAIT_SECONDS}s by another process; try again"
                )
            raise MeshError(f"pod {pod}: {Path(argv[0]).name} failed: {err[:300]}")
        return proc.stdout

    def _cgroup_ns(self) -> contextlib.AbstractContextManager:
        return self.own.entered() if self.own is not None else contextlib.nullcontext()

    def _state(self, where: Where, family: int, pod: str) -> tuple[int, bool]:
        save = self.tools.save4 if family == 4 else self.tools.save6
        return parse_state(self._run(where, [save, "-t", "nat"], None, pod))

    def _restore(self, where: Where, family: int, text: str, pod: str) -> None:
        restore = self.tools.restore4 if family == 4 else self.tools.restore6
        self._run(where, [restore, "--noflush", "-w", str(LOCK_WAIT_SECONDS)], text, pod)

    def attach(self, pod: PodHandle) -> None:
        """Install the rules for both families; undo both if either fails."""
        self._apply(pod, draining=False)

    def _apply(self, pod: PodHandle, draining: bool) -> None:
        done: list[int] = []
        cfg = replace(self.cfg, port=pod.port) if pod.port else self.cfg  # its listeners' port
        try:
            for family in (4, 6):
                jumps, _chain = self._state(Where.of(pod), family, pod.name)
                text = render_rules(cfg, family, jumps > 0, draining)
                self._restore(Where.of(pod), family, text, pod.name)
                done.append(family)
        except MeshError:
            for family in done:
                self._teardown(Where.of(pod), family, pod.name, quiet=True)
            raise

    def stop_new(self, pod: PodHandle) -> None:
        """New connections RETURN first; the REDIRECT rule stays for the ones
        already redirected (removing it drops their NAT: see render_rules).
        `remove` takes the chain away once they are gone."""
        self._apply(pod, draining=True)

    def remove(
        self, pod: str, netns_name: str, quiet: bool = False, netns_fd: int | None = None
    ) -> None:
        """Remove our chain and jumps from a pod's netns, if there."""
        for family in (4, 6):
            self._teardown(Where(netns_name, netns_fd), family, pod, quiet)

    def snapshot(self) -> dict:
        return {"flavour": self.tools.flavour}

    def listening(self, pod: PodHandle) -> None:
        """Nothing: its rules name the port (attach, refresh)."""

    def refresh(self, pod: PodHandle) -> None:
        """A pod handed over by another agent: its rules name that agent's
        cgroup, which no socket of ours is in. Rendered again for ours."""
        self._apply(pod, draining=False)

    def steering(self, pod: PodHandle) -> IptablesSteering:
        return IptablesSteering()

    def _teardown(self, where: Where, family: int, pod: str, quiet: bool) -> None:
        try:
            jumps, chain = self._state(where, family, pod)
            if jumps or chain:
                self._restore(where, family, render_teardown(jumps, chain), pod)
        except MeshError:
            if not quiet:
                raise


def teardown_only(flavour: str | None = None) -> IptablesBackend:
    """A backend that can only remove rules (it has no cgroup of its own to
    name): `cleanup`, and an agent without the iptables backend dropping
    the rules an earlier agent left in a pod."""
    detected, _how = detect_flavour(flavour)
    return IptablesBackend(RuleConfig(0, ""), Tools.of(detected))


class IptablesSteering:
    def orig_dst(self, sock: socket.socket, _ip: str, _port: int) -> Orig | None:
        found = original_dst(sock)
        return Orig(*found) if found is not None else None

    def prepare_upstream(self, sock: socket.socket, replies: bool = False) -> None:
        """Nothing to do: the nat rules RETURN for the agent's own cgroup,
        which the upstream socket was made in (own_cgroup.py). A mark would
        not do: a pod can set one (CAP_NET_RAW since 5.17)."""


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """Where a REDIRECTed connection was going (SO_ORIGINAL_DST)."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, addr), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    except OSError:
        return None
