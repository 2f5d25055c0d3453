"""Load and attach the BPF programs.

BCC compiles the text of bpf/source.py in a child process (bpf/build.py,
cached by bpf/objects.py); load_programs() creates the maps and loads the
programs a plan asks for with raw bpf(2), reporting each one the kernel
refuses with the verifier's reason; attach() links what loaded and returns a Loaded: map fds (checked
against bpf/abi.py) and link fds only. libbcc is never mapped into the agent.
"""

from __future__ import annotations

import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from meshagent import log
from meshagent.bpf import abi, btf, features, objects
from meshagent.bpf import syscall as sc
from meshagent.bpf.pins import Pins
from meshagent.bpf.programs import PROGRAM_FILES, PROGRAMS_BY_NAME, Program
from meshagent.config import AgentConfig, bpf_cflags
from meshagent.errors import MeshError

_CGROUP_PROG_TYPES = ("cgroup_sock_addr", "sock_ops")


def load_programs(
    cfg: AgentConfig,
    programs: tuple[Program, ...],
    have: tuple[str, ...] = (),
    pins: Pins | None = None,
) -> tuple[dict[str, sc.MapFd], dict[str, int], dict[str, str]]:
    """Make the maps and load programs (not attach): ({name: map},
    {name: prog fd}, {name: why refused}). The compiled object comes from
    the cache or a compile in a child process; a compile that fails refuses
    them all (and makes no maps). With pins, a pinned map of the same
    definition is taken over, state and all (a restart, an upgrade)."""
    try:
        seq = [] if any(f.startswith("-DMESH_SEQ_CHECK=") for f in cfg.extra_cflags) else [
            f"-DMESH_SEQ_CHECK={features.seq_check()}"]  # fmt: skip
        obj = objects.obtain([*bpf_cflags(cfg), *have, *btf.cflags(), *seq], cfg.cache_dir)
    except MeshError as exc:
        return {}, {}, {program.name: str(exc) for program in programs}
    maps = _adopt_maps(obj, pins) if pins is not None else obj.create_maps()
    fds: dict[str, int] = {}
    refused: dict[str, str] = {}
    try:
        if pins is not None:
            clear_residue(maps, takeover=cfg.takeover)
        for mapdef in obj.maps:
            check_map(mapdef, maps[mapdef.name])
        for program in programs:
            try:
                fds[program.name] = obj.load(program, maps)
            except objects.Refused as exc:
                refused[program.name] = str(exc)
    except BaseException:
        release(maps, fds)
        raise
    return maps, fds, refused


def _adopt_maps(obj, pins: Pins) -> dict[str, sc.MapFd]:
    """Each map: the pinned one if its definition is the same, else new."""
    fresh = obj.create_maps()
    out: dict[str, sc.MapFd] = {}
    for m in obj.maps:
        fd = pins.open("maps", m.name)
        if fd is not None and m.matches(sc.map_info(fd)):
            fresh.pop(m.name).close()
            out[m.name] = sc.MapFd(fd)
            out[m.name].adopted = True  # its entries (pods, connections) carry on
        else:
            if fd is not None:
                os.close(fd)
                log.get().warning(
                    f"BPF map {m.name} changed definition",
                    extra={"reason": "a new, empty one replaces the pinned one"},
                )
            out[m.name] = fresh.pop(m.name)
    return out


def clear_residue(maps: dict[str, sc.MapFd], takeover: bool) -> None:
    """What an earlier agent left in adopted maps that no longer holds.
    The live-connection counter is recounted from mesh_orig_tup as it is
    now: a recreated mesh_orig_tup (or mesh_state) left it counting
    connections nobody will ever decrement, and at the limit every connect
    on the node would go direct. Without a takeover no forwarded
    connection survives (the state-dir lock: the earlier agent is gone, and
    its sockets with it), so the sockmap path's peer/X/Y entries and the
    tracer's wishes of a crashed agent go too; with one, the running agent
    still owns them and hands them over."""
    if abi.STATE.name in maps and abi.ORIG_TUP.name in maps:
        recount_live(maps[abi.STATE.name], maps[abi.ORIG_TUP.name])
    if abi.POD_LIVE.name in maps and abi.ORIG_TUP.name in maps:
        recount_pods(maps[abi.POD_LIVE.name], maps[abi.ORIG_TUP.name])
    if takeover:
        return
    for spec in (abi.PEER, abi.PASSED, abi.SENT, abi.REDIR, abi.FLIGHT, abi.SEQ):
        table = maps.get(spec.name)
        if table is not None and table.adopted:
            keys = table.list_keys()
            if keys:
                table.delete_many_u64([abi.U64.unpack(key)[0] for key in keys])
                log.get().info(
                    f"BPF map {spec.name}: {len(keys)} entries of an earlier agent dropped",
                    extra={"reason": "their connections ended with that agent"},
                )
    trace = maps.get(abi.TRACE.name)
    if trace is not None and trace.adopted:
        trace.update(abi.U32.pack(0), abi.TRACE_CFG.pack(0, 0, 0, 0))


def recount_live(state: sc.MapFd, orig_tup: sc.MapFd, attempts: int = 3) -> int:
    """Set mesh_state[TUP_LIVE] to the entries mesh_orig_tup holds. The
    hooks may move the counter meanwhile: the count is taken again until
    the counter stood still around it (bounded; the last count wins)."""
    key = abi.U32.pack(abi.STATE_TUP_LIVE)
    count = 0
    for _ in range(attempts):
        before = state.lookup(key)
        count = orig_tup.count()
        if state.lookup(key) == before:
            break
    old = state.lookup(key)
    state.update(key, abi.U64.pack(count))
    was = abi.U64.unpack(old)[0] if old else 0
    if was != count:
        log.get().warning(
            f"BPF live connection counter was {was}, {count} connections are live",
            extra={"reason": "a per-connection map was recreated; recounted"},
        )
    return count


def recount_pods(pod_live: sc.MapFd, orig_tup: sc.MapFd) -> dict[int, int]:
    """Set each pod's mesh_pod_live to its entries in mesh_orig_tup (keyed
    by netns cookie first), and drop the counters of pods with none: a
    counter that drifted would hold its pod over its share for good."""
    counts: dict[int, int] = {}
    for key in orig_tup.list_keys():
        netns = abi.U64.unpack_from(key)[0]
        counts[netns] = counts.get(netns, 0) + 1
    for key in pod_live.list_keys():
        if abi.U64.unpack(key)[0] not in counts:
            pod_live.delete(key)
    for netns, count in counts.items():
        pod_live.update_u64(netns, count)
    return counts


def release(maps: dict[str, sc.MapFd], fds: dict[str, int]) -> None:
    """Close what load_programs made (when nothing is attached)."""
    for fd in fds.values():
        os.close(fd)
    for mapfd in maps.values():
        mapfd.close()


def check_map(mapdef: objects.MapDef, mapfd: sc.MapFd) -> None:
    """The Python structs (bpf/abi.py) must be the compiled C's: the sizes
    the kernel holds, and every field's offset and size."""
    spec = abi.MAPS_BY_NAME.get(mapdef.name)
    if spec is None:
        raise MeshError(f"map {mapdef.name} is not in bpf/abi.py")
    try:
        sc.check_spec(spec, mapfd.info)
        abi.check_layouts(spec, mapdef.key_struct, mapdef.value_struct)
    except ValueError as exc:
        raise MeshError(str(exc)) from None


def refusals(
    cfg: AgentConfig, programs: tuple[Program, ...], have: tuple[str, ...] = ()
) -> dict[str, str]:
    """What the kernel refuses of programs (for `probe-kernel --load`)."""
    if not programs:
        return {}
    maps, fds, refused = load_programs(cfg, programs, have)
    release(maps, fds)
    return refused


@dataclass
class Loaded:
    """What the running agent holds of the BPF side: map fds and links."""

    maps: dict[str, sc.MapFd]
    cgroup: Path
    links: dict[str, int] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)  # prog fds still held
    _stack: ExitStack = field(default_factory=ExitStack)

    def map(self, spec: abi.MapSpec) -> sc.MapFd:
        return self.maps[spec.name]

    def attached(self, name: str) -> bool:
        return name in self.links or name in self.programs

    def metric(self, reason: str) -> int:
        """One decision counter, summed over CPUs."""
        key = abi.U32.pack(abi.REASONS.index(reason))
        return sum(self.map(abi.METRICS).lookup_percpu_u64(key))

    def metrics(self) -> dict[str, dict[str, int]]:
        """{reason: {"egress": count}} summed over CPUs; zeros left out
        (the whole per-CPU array in one batch lookup where the kernel can)."""
        table = self.map(abi.METRICS)
        items = table.items_batched()
        if items is None:
            present = table.list_keys()
            items = [(key, table.lookup(key) or b"") for key in present]
        stride = sc.round8(table.info.value_size)
        out: dict[str, dict[str, int]] = {}
        for key, raw in items:
            (reason,) = abi.U32.unpack(key)
            total = sum(struct.unpack_from("=Q", raw, off)[0] for off in range(0, len(raw), stride))
            if total and reason < len(abi.REASONS):
                out[abi.REASONS[reason]] = {abi.DIRECTION: total}
        return out

    def live_steered(self) -> int:
        raw = self.map(abi.STATE).lookup(abi.U32.pack(abi.STATE_TUP_LIVE))
        return abi.U64.unpack(raw)[0] if raw else 0

    def snapshot(self) -> dict:
        """What is attached, the decision counters, and how many entries the
        per-connection maps hold (all zero once every connection is gone)."""
        counted = []
        if "mesh_connect4" in self.links:
            counted.append(abi.ORIG_TUP)
        if "mesh_verdict" in self.programs:
            counted += [
                abi.SOCKHASH,
                abi.PEER,
                abi.PASSED,
                abi.SENT,
                abi.REDIR,
                abi.FLIGHT,
                abi.SEQ,
            ]
        if "mesh_msg" in self.programs:
            counted += [abi.APPHASH, abi.MSG_PASS, abi.MSG_TGT]
        return {
            "programs": [n for n in PROGRAM_FILES if n in self.links or n in self.programs],
            "decisions": self.metrics(),
            "live_steered": self.live_steered() if "mesh_connect4" in self.links else 0,
            "map_entries": {spec.name: self.map(spec).count() for spec in counted},
        }

    def on_close(self, fn) -> None:
        """Run fn at close(), before the fds close (a map's mmap, say)."""
        self._stack.callback(fn)

    def close(self) -> None:
        """Close every fd; safe to call twice. Unpinned links detach with
        their fd; pinned ones stay attached for the next agent."""
        self._stack.close()


def attach(
    prog_fds: dict[str, int], maps: dict[str, sc.MapFd], cgroup: Path, pins: Pins | None = None
) -> Loaded:
    """Link the cgroup programs at the cgroup and the verdict to the
    sockhash. With pins, a pinned link at the same cgroup gets the new
    program in one step (BPF_LINK_UPDATE), and maps, programs and links are
    pinned once all is attached; links no longer planned are detached. On
    failure, undo what this call attached and raise MeshError."""
    loaded = Loaded(maps=maps, cgroup=cgroup)
    stack = loaded._stack
    for mapfd in maps.values():
        stack.callback(mapfd.close)
    for fd in prog_fds.values():
        stack.callback(os.close, fd)
    made: list[int] = []  # links this call created: detached if it fails
    try:
        cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, cgroup_fd)
        cgroup_id = os.fstat(cgroup_fd).st_ino
        for name, prog_fd in prog_fds.items():
            program = PROGRAMS_BY_NAME[name]
            if program.prog_type in _CGROUP_PROG_TYPES:
                link = _link(name, program, prog_fd, cgroup_fd, cgroup_id, cgroup, pins, made)
                loaded.links[name] = link
                stack.callback(os.close, link)
            else:
                target = maps[program.target].fd
                try:
                    sc.prog_attach(prog_fd, target, program.attach_type)  # replaces any
                except OSError as exc:
                    raise MeshError(
                        f"cannot attach {name} to {program.target}: {exc.strerror}"
                    ) from None
                loaded.programs[name] = prog_fd
        if pins is not None:
            _pin_all(loaded, prog_fds, pins)
    except BaseException:
        for link in made:
            _detach(link)
        loaded.close()
        raise
    if pins is None:  # nothing outlives the agent: detach at close
        for link in loaded.links.values():
            stack.callback(_detach, link)
    return loaded


def _link(name, program, prog_fd, cgroup_fd, cgroup_id, cgroup, pins, made) -> int:
    old = pins.open("links", name) if pins is not None else None
    if old is not None:
        info = sc.link_info(old)
        if (info.cgroup_id, info.attach_type) == (cgroup_id, program.attach_type):
            try:
                sc.link_update(old, prog_fd)
                return old
            except OSError as exc:
                log.get().warning(
                    f"cannot update pinned link {name}", extra={"reason": exc.strerror}
                )
        _detach(old)
        os.close(old)
    try:
        link = sc.link_create(prog_fd, cgroup_fd, program.attach_type)
    except OSError as exc:
        raise MeshError(
            f"cannot attach {name} at cgroup {cgroup}: {exc.strerror}"
            " (BPF links need kernel 5.7+; try --redirect iptables)"
        ) from None
    made.append(link)
    return link


def _pin_all(loaded: Loaded, prog_fds: dict[str, int], pins: Pins) -> None:
    for name, mapfd in loaded.maps.items():
        if not mapfd.adopted:
            pins.put("maps", name, mapfd.fd)
    for name, fd in prog_fds.items():
        pins.put("progs", name, fd)
    for name, link in loaded.links.items():
        pins.put("links", name, link)
    for kind, kept in (("links", loaded.links), ("progs", prog_fds), ("maps", loaded.maps)):
        for name in pins.names(kind):
            if name not in kept:
                pins.drop(kind, name)


def _detach(link: int) -> None:
    try:
        sc.link_detach(link)
    except OSError:
        pass
