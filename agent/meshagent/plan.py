"""The one place the agent decides what to use: plan(probe, config) -> Plan.

Pure: no I/O, so `meshagent run`, `meshagent probe-kernel` and the demo
agree by construction, and the unit tests run it over other kernels'
facts. When the kernel refuses a program at load, the agent adds that to
the probe (Probe.with_refused) and asks again: under auto the plan then
falls through (ebpf -> iptables, sockmap -> splice), it never exits.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshagent.bpf.programs import KERNEL_FEATURES, Program, Role, by_role, have_macro
from meshagent.kernel import Probe
from meshagent.modes import Backend, DataPathChoice, DataPathMode, Redirect

_WHAT = {feature.name: feature for feature in KERNEL_FEATURES}
EBPF_HOST_NEEDS = ("cgroup2", "kernel_headers", "bcc", "so_netns_cookie")
SOCKMAP_HOST_NEEDS = ("kernel_headers", "bcc", "tcp_sock_btf")


@dataclass(frozen=True)
class Plan:
    backend: Backend | None  # the default for pods attached without --redirect
    backend_reason: str
    backends: tuple[Backend, ...]  # what a pod may be attached with
    programs: tuple[Program, ...]  # what to load and attach
    datapaths: tuple[DataPathMode, ...]  # in order: the first whose self-test passes
    datapath_reason: str
    notes: tuple[str, ...] = ()
    error: str | None = None  # what was asked for cannot be done here
    cflags: tuple[str, ...] = ()  # -DMESH_HAVE_* for optional features the kernel has

    @property
    def sockmap(self) -> bool:
        return any(program.role is Role.VERDICT for program in self.programs)

    @property
    def msg(self) -> bool:
        """The sockmap path may use sk_msg (bpf/sk_msg.c) for ebpf pods."""
        return any(program.role is Role.MSG for program in self.programs)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend.value if self.backend else None,
            "backend_reason": self.backend_reason,
            "backends": [b.value for b in self.backends],
            "programs": [p.name for p in self.programs],
            "datapath": self.datapaths[0].value if self.datapaths else None,
            "datapaths": [d.value for d in self.datapaths],
            "datapath_reason": self.datapath_reason,
            "notes": list(self.notes),
            "error": self.error,
            "cflags": list(self.cflags),
        }


def _lacking(probe: Probe, host_needs: tuple[str, ...], programs: tuple[Program, ...]) -> str:
    """Why these programs cannot run, in one phrase ('' if they can)."""
    refused = [probe.refused[p.name] for p in programs if p.name in probe.refused]
    if refused:
        return refused[0]
    names = probe.missing(host_needs)
    for program in programs:
        names += [n for n in probe.missing(program.needs) if n not in names]
    if not names:
        return ""
    return "lacks " + ", ".join(
        f"{n} ({_WHAT[n].what}, {_WHAT[n].since[0]}.{_WHAT[n].since[1]}+)" if n in _WHAT else n
        for n in names
    )


def _headers_or_bcc(probe: Probe, what: str) -> str | None:
    """The fix, in the words people need, when it is a host package."""
    if not probe.has("kernel_headers"):
        return (
            f"{what}: kernel headers for {probe.kernel} not found"
            f" ({probe.features['kernel_headers'].how}):"
            " run scripts/bootstrap (installs linux-headers-amd64 and links them)"
        )
    if not probe.has("bcc"):
        return f"{what}: BCC is not installed (python3-bpfcc): run scripts/bootstrap"
    return None


def plan(probe: Probe, config) -> Plan:
    """config: anything with .redirect and .datapath (an AgentConfig)."""
    redirect = Redirect(config.redirect)
    ebpf_why = _lacking(probe, EBPF_HOST_NEEDS, by_role(Role.REDIRECT))
    sockmap_why = _lacking(probe, SOCKMAP_HOST_NEEDS, by_role(Role.VERDICT))
    iptables_ok = probe.has("iptables")
    notes: list[str] = []
    error = None

    hooks = not ebpf_why and redirect is not Redirect.IPTABLES
    backends = tuple(b for b, ok in ((Backend.EBPF, hooks), (Backend.IPTABLES, iptables_ok)) if ok)
    if redirect is Redirect.EBPF:
        backend = Backend.EBPF if hooks else None
        backend_reason = "asked for with --redirect ebpf"
        if not hooks:
            error = _headers_or_bcc(probe, "--redirect ebpf") or (
                f"--redirect ebpf: ebpf {ebpf_why} (see `meshagent probe-kernel`);"
                " use --redirect iptables or auto"
            )
    elif redirect is Redirect.IPTABLES:
        backend = Backend.IPTABLES if iptables_ok else None
        backend_reason = "asked for with --redirect iptables"
        if not iptables_ok:
            error = f"--redirect iptables: {probe.features['iptables'].how}"
    elif hooks:
        backend = Backend.EBPF
        backend_reason = "the kernel has every program the ebpf backend needs"
    elif iptables_ok:
        backend = Backend.IPTABLES
        backend_reason = f"ebpf unavailable: {ebpf_why}"
    else:
        backend = None
        backend_reason = f"ebpf unavailable: {ebpf_why}"
        error = f"no redirect backend: ebpf {ebpf_why}, and {probe.features['iptables'].how}"

    programs: list[Program] = []
    if hooks:
        programs += by_role(Role.REDIRECT)
        for program in by_role(Role.PEERNAME):
            problem = probe.program_problem(program)
            if problem:
                notes.append(f"applications see the listener as their peer: {problem}")
            else:
                programs.append(program)
    # The verdict loads whenever it can, so `datapath set sockmap` works
    # whatever the agent started with.
    if not sockmap_why:
        programs += by_role(Role.VERDICT)
        # The sk_msg fast path needs the pods' sockets from sock_ops: ebpf only.
        msg_why = probe.missing(("sock_hash_update_sock_ops",)) or [
            problem for p in by_role(Role.MSG) if (problem := probe.program_problem(p))
        ]
        if hooks and not msg_why:
            programs += by_role(Role.MSG)
        elif hooks:
            notes.append(f"no sk_msg fast path: {msg_why[0]}")

    datapaths, datapath_reason, datapath_error = _datapaths(probe, config, sockmap_why)
    optional = sorted({f for p in programs for f in p.optional if probe.has(f)})
    return Plan(
        backend=backend,
        backend_reason=backend_reason,
        backends=backends,
        programs=tuple(programs),
        datapaths=datapaths,
        datapath_reason=datapath_reason,
        notes=tuple(notes),
        error=error or datapath_error,
        cflags=tuple(f"-D{have_macro(feature)}=1" for feature in optional),
    )


def _datapaths(
    probe: Probe, config, sockmap_why: str
) -> tuple[tuple[DataPathMode, ...], str, str | None]:
    choice = DataPathChoice(config.datapath)
    splice_ok = probe.has("splice")
    if choice is DataPathChoice.AUTO:
        order = [DataPathMode.SOCKMAP] if not sockmap_why else []
        order += [DataPathMode.SPLICE] if splice_ok else []
        order.append(DataPathMode.COPY)
        tested = ", then ".join(mode.value for mode in order)
        reason = f"self-tested at start: {tested}"
        if sockmap_why:
            reason = f"sockmap {sockmap_why}; {reason}"
        return tuple(order), reason, None
    mode = DataPathMode(choice.value)
    why_not = {DataPathMode.SOCKMAP: sockmap_why, DataPathMode.SPLICE: "" if splice_ok else
               "lacks splice(2)"}.get(mode, "")  # fmt: skip
    if why_not:
        return (
            (mode,),
            f"asked for with --datapath {mode}",
            f"--datapath {mode}: not available ({why_not}); use --datapath auto",
        )
    return (mode,), f"asked for with --datapath {mode}", None
