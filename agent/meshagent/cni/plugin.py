"""meshagent-cni: a chained CNI plugin (spec 1.0.0; 0.3.x and 0.4.0 configs too).

The runtime runs it after the plugins that make the pod's interface (say
bridge + host-local), with their result as prevResult. It changes nothing
in the pod: ADD records the pod (NAMESPACE/NAME -> netns, UID, addresses)
under the agent's state dir and tells a running agent, which attaches the
pod if it is opted in; with no agent running the record is enough (the
agent attaches at start). DEL detaches and removes the record, and is
idempotent. CHECK verifies the record. VERSION lists the versions.

Its entry in the conflist:
  {"type": "meshagent-cni", "stateDir": "/run/meshagent",
   "attach": "labelled" | "all", "excludeNamespaces": ["kube-system"],
   "whenNoAgent": "start" | "wait"}
"labelled" (the default) leaves the choice to the agent's API watch (label
meshagent.io/attach=true on the pod or its namespace); "all" attaches every
pod outside excludeNamespaces. With no agent running, "start" (the default)
lets the pod start unmeshed (its connections go direct until an agent
runs); "wait" fails ADD with code 11 (try again later) for every pod
outside excludeNamespaces, so the runtime keeps retrying its sandbox and
the pod starts only once an agent answers: it never sends unmeshed.

Errors are the spec's JSON on stdout, with its codes, and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from meshagent.config import AgentConfig

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
ATTACH = ("labelled", "all")  # the first: the default, here and in `cni install`
WHEN_NO_AGENT = ("start", "wait")  # likewise
EXCLUDE_NAMESPACES = ("kube-system",)  # the default of excludeNamespaces
AGENT_TIMEOUT = 10.0

# The spec's well-known error codes.
E_VERSION = 1
E_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_ENV = 4
E_IO = 5
E_DECODE = 6
E_CONFIG = 7
E_TRY_LATER = 11
E_INTERNAL = 100  # the first plugin-specific code: a bug here, never a traceback


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Conf:
    cni_version: str
    name: str
    state_dir: Path
    attach_all: bool
    exclude_namespaces: tuple[str, ...]
    prev_result: dict | None
    wait_for_agent: bool = False  # whenNoAgent "wait"


def parse_conf(raw: bytes, command: str) -> Conf:
    try:
        data = json.loads(raw.decode() or "null")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(E_DECODE, f"network configuration on stdin is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CniError(E_DECODE, "network configuration on stdin must be a JSON object")
    version = data.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(E_CONFIG, "network configuration lacks cniVersion")
    if version not in SUPPORTED:
        raise CniError(
            E_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED)}",
        )
    if command == "VERSION":
        return Conf(version, "", AgentConfig.state_dir, False, (), None)
    name = data.get("name", "")
    state_dir = data.get("stateDir", str(AgentConfig.state_dir))
    if not isinstance(state_dir, str) or not state_dir.startswith("/"):
        raise CniError(E_CONFIG, f"stateDir {state_dir!r} must be an absolute path")
    attach = data.get("attach", ATTACH[0])
    if attach not in ATTACH:
        raise CniError(E_CONFIG, f'attach {attach!r}: use "labelled" or "all"')
    exclude = data.get("excludeNamespaces", list(EXCLUDE_NAMESPACES))
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise CniError(E_CONFIG, "excludeNamespaces must be a list of namespace names")
    when = data.get("whenNoAgent", WHEN_NO_AGENT[0])
    if when not in WHEN_NO_AGENT:
        raise CniError(E_CONFIG, f'whenNoAgent {when!r}: use "start" or "wait"')
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(E_CONFIG, "prevResult must be a JSON object")
    if prev is not None and not isinstance(prev.get("ips", []), list | None):
        raise CniError(E_CONFIG, "prevResult.ips must be a list")
    return Conf(version, str(name), Path(state_dir), attach == "all", tuple(exclude), prev,
                when == "wait")  # fmt: skip


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: 'K=V;K=V'."""
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(E_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key] = value
    return out


def need_env(env: dict[str, str], *names: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CniError(E_ENV, f"missing environment variable {', '.join(missing)}")


def _pod(env: dict[str, str]) -> tuple[str, str, str] | None:
    args = parse_args(env.get("CNI_ARGS", ""))
    namespace, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if not namespace or not name:
        return None  # not a Kubernetes pod: nothing to record
    return namespace, name, args.get("K8S_POD_UID", "")


def _ips(prev: dict | None) -> list[str]:
    out = []
    for entry in (prev or {}).get("ips", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            out.append(entry["address"].split("/")[0])
    return out


def _tell_agent(state_dir: Path, op: str, pod: str) -> dict | None:
    """The agent's answer, or None when no agent is running."""
    from meshagent.client import request
    from meshagent.errors import MeshError, NoAgent
    from meshagent.state import StateDir

    socket_path = StateDir(state_dir).socket
    if not socket_path.exists():
        return None
    try:
        return request(socket_path, op, timeout=AGENT_TIMEOUT, pod=pod)
    except NoAgent:
        return None
    except MeshError as exc:
        return {"error": str(exc)}


def cmd_add(conf: Conf, env: dict[str, str]) -> dict:
    need_env(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if conf.prev_result is None:
        raise CniError(
            E_CONFIG,
            "meshagent-cni is a chained plugin: list it after the plugin that makes"
            " the pod's interface (no prevResult)",
        )
    result = {**conf.prev_result, "cniVersion": conf.cni_version}
    pod = _pod(env)
    if pod is None:
        return result
    netns_path = env["CNI_NETNS"]
    if not os.path.exists(netns_path):
        raise CniError(E_UNKNOWN_CONTAINER, f"network namespace {netns_path} does not exist")
    from meshagent.errors import MeshError
    from meshagent.pods.kubelet import CniStore, new_record, split_name

    namespace, name, uid = pod
    try:
        split_name(f"{namespace}/{name}")
    except MeshError as exc:
        raise CniError(E_ENV, f"CNI_ARGS: {exc}") from None
    record = new_record(
        namespace=namespace,
        name=name,
        uid=uid,
        container_id=env["CNI_CONTAINERID"],
        netns=netns_path,
        ifname=env["CNI_IFNAME"],
        ips=_ips(conf.prev_result),
        attach=conf.attach_all and namespace not in conf.exclude_namespaces,
    )
    _strict_rules(conf, record.full_name, namespace, name, netns_path)
    # From here on only our own bookkeeping: whatever fails, the pod starts
    # (the agent finds it by its cgroup, or attaches it at start).
    try:
        _make_state_dir(conf.state_dir)
        CniStore(conf.state_dir).save(record)
    except (OSError, MeshError) as exc:
        _warn(record.full_name, f"cannot write its record ({exc}); the pod starts unrecorded")
        return result
    try:
        answer = _tell_agent(conf.state_dir, "cni-add", record.full_name)
    except Exception as exc:  # the pod must start whatever the agent does
        answer = {"error": f"telling the agent failed: {exc!r}"}
    if conf.wait_for_agent and namespace not in conf.exclude_namespaces:
        # The runtime calls DEL (which removes the record) and retries ADD.
        if answer is None:
            raise CniError(
                E_TRY_LATER,
                f"pod {record.full_name}: no meshagent agent runs on this node; the pod"
                " waits for one (whenNoAgent: wait)",
            )
        if answer.get("undecided"):
            raise CniError(
                E_TRY_LATER,
                f"pod {record.full_name}: the agent cannot tell yet whether to attach it"
                f" ({answer.get('reason')}); the pod waits (whenNoAgent: wait)",
            )
    if answer is not None and answer.get("error"):
        # The pod runs either way: the agent logs why and retries at start.
        _warn(record.full_name, str(answer["error"]))
    return result


def _strict_rules(conf: Conf, pod: str, namespace: str, name: str, netns_path: str) -> None:
    """A pod the mesh's labels make strict gets its rules now, before its
    containers run (mesh/strict.py); without them it does not start."""
    from meshagent.errors import MeshError
    from meshagent.mesh import strict
    from meshagent.mesh.kubeview import strict_at_add

    if not strict_at_add(conf.state_dir, namespace, name):
        return
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CniError(E_UNKNOWN_CONTAINER, f"pod {pod}: {netns_path}: {exc.strerror}") from None
    try:
        # The node's addresses toward the pod (its gateways), for the kubelet's probes.
        strict.apply_fd(fd, True, what=f"pod {pod}", allow_node=True,
                        gateways=_gateways(conf.prev_result))  # fmt: skip
    except MeshError as exc:
        raise CniError(
            E_INTERNAL, f"pod {pod} is strict (mTLS) and its rules failed: {exc}"
        ) from None
    finally:
        os.close(fd)


def _gateways(prev: dict | None) -> dict[int, list[str]]:
    """The gateways of the pod's addresses in prevResult, by IP version."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for entry in (prev or {}).get("ips") or []:
        gateway = entry.get("gateway") if isinstance(entry, dict) else None
        if gateway:
            out[6 if ":" in gateway else 4].append(str(gateway))
    return out


def _warn(pod: str, why: str) -> None:
    print(f"meshagent-cni: pod {pod}: {why}", file=sys.stderr)


def cmd_del(conf: Conf, env: dict[str, str]) -> None:
    need_env(env, "CNI_CONTAINERID", "CNI_IFNAME")
    pod = _pod(env)
    if pod is None:
        return
    from meshagent.errors import MeshError
    from meshagent.pods.kubelet import CniStore

    full = f"{pod[0]}/{pod[1]}"
    store = CniStore(conf.state_dir)
    try:
        record = store.get(full)
    except MeshError:
        record = None  # unreadable: remove it below
    if record is not None and record.container_id != env["CNI_CONTAINERID"]:
        return  # a late DEL of an older sandbox of this pod
    if record is not None:
        _tell_agent(conf.state_dir, "cni-del", full)
    try:
        store.path(full).unlink(missing_ok=True)
    except (OSError, MeshError):
        pass


def cmd_check(conf: Conf, env: dict[str, str]) -> None:
    need_env(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if conf.prev_result is None:
        raise CniError(E_CONFIG, "CHECK needs prevResult")
    pod = _pod(env)
    if pod is None:
        return
    from meshagent.errors import MeshError
    from meshagent.pods.kubelet import CniStore

    full = f"{pod[0]}/{pod[1]}"
    try:
        record = CniStore(conf.state_dir).get(full)
    except MeshError as exc:
        raise CniError(E_IO, str(exc)) from None
    if record is None or record.container_id != env["CNI_CONTAINERID"]:
        raise CniError(E_UNKNOWN_CONTAINER, f"pod {full}: no record of this sandbox")
    if record.netns != env["CNI_NETNS"] or not os.path.exists(record.netns):
        raise CniError(E_UNKNOWN_CONTAINER, f"pod {full}: its network namespace changed or is gone")


def _make_state_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)


def run(env: dict[str, str], stdin: bytes) -> tuple[int, str]:
    """(exit status, stdout text) of one call."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command not in COMMANDS:
            raise CniError(E_ENV, f"unknown CNI_COMMAND {command!r}: use {', '.join(COMMANDS)}")
        conf = parse_conf(stdin, command)
        version = conf.cni_version
        if command == "VERSION":
            return 0, json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED)})
        if command == "ADD":
            return 0, json.dumps(cmd_add(conf, env))
        if command == "DEL":
            cmd_del(conf, env)
        else:
            cmd_check(conf, env)
        return 0, ""
    except CniError as exc:
        return 1, _error_json(version, exc.code, exc.msg, exc.details)
    except Exception as exc:  # the runtime reads spec JSON, never a traceback
        return 1, _error_json(version, E_INTERNAL, f"{command}: internal error: {exc!r}")


def _error_json(version: str, code: int, msg: str, details: str = "") -> str:
    error = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        error["details"] = details
    return json.dumps(error)


def main() -> None:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        code, out = 1, json.dumps({"cniVersion": "1.0.0", "code": E_IO, "msg": f"stdin: {exc}"})
    else:
        code, out = run(dict(os.environ), stdin)
    if out:
        print(out)
    if code:
        print(f"meshagent-cni: {json.loads(out)['msg']}", file=sys.stderr)
    sys.exit(code)
