"""The compiled BPF object: obtained from the cache or a compile in a child
process (bpf/build.py), then loaded with raw bpf(2) in the agent.

The agent never maps libbcc or LLVM: a compile runs `python -m
meshagent.bpf.build` once per source text, -D flags and kernel release, and
its result is kept in the cache dir (--cache-dir, root-owned), so a warm
start only creates maps and loads programs (milliseconds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshagent import log
from meshagent.bpf import abi
from meshagent.bpf import syscall as sc
from meshagent.bpf.build import FORMAT
from meshagent.bpf.programs import Program
from meshagent.bpf.source import headers_path, render_source, require_headers, verifier_reason
from meshagent.errors import MeshError

COMPILE_TIMEOUT = 300


@dataclass(frozen=True)
class MapDef:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_struct: abi.Layout | None = None  # the key's struct as compiled; None: a scalar
    value_struct: abi.Layout | None = None

    def matches(self, info: sc.MapInfo) -> bool:
        """Is a map the kernel holds (e.g. a pinned one) this definition?"""
        return (info.map_type, info.key_size, info.value_size, info.max_entries, info.flags) == (
            self.type, self.key_size, self.value_size, self.max_entries, self.flags
        )  # fmt: skip


@dataclass(frozen=True)
class BpfObject:
    key: str
    maps: tuple[MapDef, ...]
    code: dict[str, tuple[bytes, tuple[tuple[int, str], ...]]]  # name: (insns, relocations)
    license: str
    compile_seconds: float
    cached: bool  # taken from the cache (no compile this time)

    def create_maps(self) -> dict[str, sc.MapFd]:
        """Every map, new and empty; on failure none is left open."""
        out: dict[str, sc.MapFd] = {}
        try:
            for m in self.maps:
                try:
                    fd = sc.map_create(
                        m.type, m.key_size, m.value_size, m.max_entries, m.flags, m.name
                    )
                except OSError as exc:
                    raise MeshError(f"cannot create BPF map {m.name}: {exc.strerror}") from None
                out[m.name] = sc.MapFd(fd)
        except BaseException:
            for mapfd in out.values():
                mapfd.close()
            raise
        return out

    def load(self, program: Program, maps: dict[str, sc.MapFd]) -> int:
        """The program's fd, its map references bound to maps; Refused with
        the verifier's reason if the kernel will not have it."""
        insns, relocations = self.code[program.name]
        code = bytearray(insns)
        for index, name in relocations:
            struct.pack_into("=i", code, index * 8 + 4, maps[name].fd)
        expected = program.attach_type if program.prog_type == "cgroup_sock_addr" else 0
        fd, err, _log = sc.prog_load(
            program.prog_type_id, bytes(code), expected, name=program.name,
            license=self.license, log_size=0,
        )  # fmt: skip
        if fd is not None:
            return fd
        # Again with the verifier's log, only to say why.
        _fd, err, text = sc.prog_load(
            program.prog_type_id, bytes(code), expected, name=program.name,
            license=self.license, log_size=1 << 24,
        )  # fmt: skip
        reason = verifier_reason(text) or os.strerror(err)
        raise Refused(f"{program.name} ({program.file}) refused by the kernel: {reason}")


class Refused(Exception):
    pass


def cache_key(source: str, cflags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (f"format {FORMAT}", os.uname().release, source, *cflags):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:32]


def check_cache_dir(path: Path) -> None:
    """The cache decides what the kernel runs: only root may write there."""
    from meshagent.host.files import check_owner_only

    check_owner_only(path, "cache dir", ", or use another --cache-dir")


def obtain(cflags: list[str], cache_dir: Path) -> BpfObject:
    """The compiled object for these flags on this kernel: from the cache,
    else compiled now in a child process (seconds; logged with progress)."""
    key = cache_key(render_source(), cflags)
    check_cache_dir(cache_dir)
    path = cache_dir / f"bpf-{key}.json"
    if path.exists():
        try:
            return _parse(json.loads(path.read_text()), key, cached=True)
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # a damaged entry: compile again
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    _compile(cflags, path)
    return _parse(json.loads(path.read_text()), key, cached=False)


def _compile(cflags: list[str], path: Path) -> None:
    require_headers()
    logger = log.get()
    logger.info(
        "compiling the BPF programs (once per kernel and flags; a few seconds)",
        extra={"reason": f"no cached object {path.name}"},
    )
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshagent.bpf.build", str(path), *cflags],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT, env=_child_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise MeshError(f"compiling the BPF programs took more than {COMPILE_TIMEOUT}s") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if any("No module named 'bcc'" in line for line in lines):
            raise MeshError(
                "BCC is not installed (Debian package python3-bpfcc): run scripts/bootstrap"
            )
        first = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
        raise MeshError(
            f"BCC could not compile the BPF programs ({first.strip()}); check the kernel"
            f" headers at {headers_path()} or run scripts/bootstrap"
        )
    logger.info(
        "BPF programs compiled",
        extra={"reason": f"{time.monotonic() - started:.1f}s; cached as {path}"},
    )


def _child_env() -> dict[str, str]:
    """The child finds this very package, wherever it runs from."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


def _parse(raw: dict, key: str, cached: bool) -> BpfObject:
    if raw.get("format") != FORMAT or raw.get("kernel") != os.uname().release:
        raise ValueError("another format or kernel")
    maps = tuple(_mapdef(m) for m in raw["maps"])
    code = {
        name: (
            base64.b64decode(entry["insns"]),
            tuple((int(i), str(n)) for i, n in entry["relocations"]),
        )
        for name, entry in raw["programs"].items()
    }
    known = {m.name for m in maps}
    for _insns, relocs in code.values():
        if any(name not in known for _i, name in relocs):
            raise ValueError("a relocation names an unknown map")
    return BpfObject(key, maps, code, raw["license"], float(raw["compile_seconds"]), cached)


def _mapdef(raw: dict) -> MapDef:
    layouts = {part: _layout(raw[part]) for part in ("key_struct", "value_struct")}
    return MapDef(**{**raw, **layouts})


def _layout(raw: list | None) -> abi.Layout | None:
    if raw is None:
        return None
    name, fields = raw
    return str(name), tuple((str(field), int(offset), int(size)) for field, offset, size in fields)
