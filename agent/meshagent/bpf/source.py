"""The C side as text: where the sources are, the one text BCC compiles,
the kernel headers it needs, and what the verifier said.

BCC's rewriter only handles the main file, so our own quoted includes are
inlined into one text with #line marks (what `run --dump-bpf` prints is
exactly what is compiled). Configuration enters only as -DMESH_* cflags.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from meshagent.bpf.programs import PROGRAM_FILES
from meshagent.errors import MeshError

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_NOT_A_REASON = re.compile(r"^(\d+: |; |processed |verification time|stack depth|bpf: Failed)")


def bpf_dir() -> Path:
    """The C sources: meshagent/bpf/c in an installed wheel, else bpf/ at
    the top of the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "c", here.parent.parent.parent / "bpf"):
        if (candidate / "include" / "maps.h").exists():
            return candidate
    raise MeshError("BPF sources not found (expected meshagent/bpf/c or bpf/ in the source tree)")


def render_source(files: tuple[str, ...] = tuple(PROGRAM_FILES.values())) -> str:
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


def headers_path() -> Path:
    source = os.environ.get("BCC_KERNEL_SOURCE")
    if source:
        return Path(source)
    return Path("/lib/modules") / os.uname().release / "build"


def has_headers() -> bool:
    path = headers_path()
    return (path / "include").is_dir() or (path / "Makefile").exists()


def require_headers() -> None:
    if not has_headers():
        raise MeshError(
            f"kernel headers for {os.uname().release} not found at {headers_path()}:"
            " run scripts/bootstrap (installs linux-headers-amd64 and links them)"
        )


def verifier_reason(log: str) -> str:
    """The line of a verifier log that says why: the last one that is
    neither an instruction nor a statistic."""
    lines = [
        line.strip() for line in log.splitlines() if line.strip() and not _NOT_A_REASON.match(line)
    ]
    return lines[-1] if lines else ""
