"""meshagent run | attach | detach | status | cleanup: the agent and its local API."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meshagent.cli.app import App, require_root
from meshagent.cli.options import cache_dir_option, output_option, plan_options
from meshagent.config import AgentConfig
from meshagent.modes import (
    Backend,
    DataPathMode,
    LogFormat,
    PodMode,
    values,
)

RUN_EPILOG = """\b
Examples:
  meshagent run                                   # attach at the cgroup v2 root
  meshagent run --cgroup meshtest --exclude-ports 22,9000-9010
  meshagent run --exclude-cidrs 10.96.0.0/12 --log-format json
"""


@click.command(epilog=RUN_EPILOG)
@click.option(
    "--cgroup",
    "cgroup_path",
    show_default="the cgroup v2 root",
    help="cgroup v2 path to attach at (absolute, or relative to the mount).",
)
@click.option("--port", type=int, default=AgentConfig.port, help="Forwarder listener port.")
@click.option("--exclude-ports", help="Destination ports never steered: 22,53,9000-9010.")
@click.option("--exclude-cidrs", help="Destination networks never steered: 10.96.0.0/12,fd00::/8.")
@click.option(
    "--log-format",
    type=click.Choice(values(LogFormat)),
    default=AgentConfig.log_format.value,
    help="The agent's log on stderr: text lines, or one JSON object a line.",
)
@click.option(
    "--conns-max", type=int, default=AgentConfig.conns_max, help="Steered connections in flight."
)
@click.option(
    "--metrics-addr",
    default=AgentConfig.metrics_addr,
    envvar="MESHAGENT_METRICS_ADDR",
    help="Where /metrics, /healthz and /readyz are served (HOST:PORT), or off.",
)
@click.option(
    "--pod-conns-max",
    type=int,
    default=AgentConfig.pod_conns_max,
    help="Connections one pod may have forwarded at once; beyond, its new ones wait in its"
    " listener's backlog.",
)
@click.option(
    "--memory-max",
    default="auto",
    help="Bytes forwarded connections may hold in the kernel's buffers and the agent's, all"
    " pods together (512M, 2G); each pod is sure of a fair share. auto: 3/4 of the agent's"
    " memory cgroup limit less 64M, or an eighth of the node's memory.",
)
@click.option(
    "--sockmap-sndbuf",
    type=int,
    default=AgentConfig.sockmap_sndbuf,
    help="Send buffer (bytes, the kernel doubles it) of spliced sockets; it also bounds what"
    " the forwarder carries while the budget holds bytes back. 0 leaves it to the kernel.",
)
@click.option(
    "--sockmap-budget",
    type=int,
    default=AgentConfig.sockmap_budget,
    help="Bytes a spliced connection may have on their way to a reader, per direction,"
    " before the kernel holds the rest back (back-pressure).",
)
@click.option(
    "--sockmap-msg/--no-sockmap-msg",
    envvar="MESHAGENT_SOCKMAP_MSG",
    default=AgentConfig.sockmap_msg,
    help="On the sockmap path, an ebpf pod's sends skip the hop to the forwarder's socket:"
    " sk_msg puts them from the pod's socket onto the upstream socket (kernel 5.15+)."
    " Replies go as without it (spliced to the forwarder's socket facing the pod). Off by"
    " default: the pod's socket then joins a sockmap, where the kernel can return EAGAIN"
    " to a blocking read while the same socket writes (non-blocking applications are not"
    " affected).",
)
@click.option(
    "--sockmap-replies/--no-sockmap-replies",
    envvar="MESHAGENT_SOCKMAP_REPLIES",
    default=AgentConfig.sockmap_replies,
    help="With --sockmap-msg, a server of this node (under the attach point) sends its"
    " replies straight into the pod's socket once the pod has read all that came before,"
    " within the pod's free receive memory; otherwise they go the usual way. Off by"
    " default: the server's socket then joins a sockmap, where the kernel can return"
    " EAGAIN to a blocking read (non-blocking servers such as redis are not"
    " affected).",
)
@click.option(
    "--takeover",
    type=click.Choice(["always", "auto"]),
    is_flag=False,
    flag_value="always",
    default=None,
    help="Upgrade in place: receive the running agent's pods, listeners and forwarded"
    " connections; it exits without ending any. --takeover=auto: only if an agent runs on"
    " the state dir, else start as usual (the DaemonSet's agent).",
)
@click.option(
    "--after-handover",
    type=click.Choice(["exit", "wait"]),
    default=AgentConfig.after_handover,
    show_default=True,
    help="Once handed over to a successor: exit, or wait to be stopped (SIGTERM): in a"
    " container, whose exit the kubelet would answer with a restart.",
)
@click.option(
    "--kube",
    type=click.Choice(["auto", "on", "off"]),
    default=AgentConfig.kube,
    envvar="MESHAGENT_KUBE",
    help="Watch this node's pods on the API server (auto: when --kubeconfig is given or"
    " running in a cluster) and attach those labelled meshagent.io/attach=true.",
)
@click.option(
    "--kubeconfig",
    envvar="MESHAGENT_KUBECONFIG",
    show_default="in-cluster",
    help="kubeconfig for the API watch.",
)
@click.option(
    "--node-name",
    envvar="NODE_NAME",
    help="This node's name (the API watch's filter; the mesh file's entry for this node)."
    "  [default: the host name]",
)
@click.option(
    "--mesh",
    "mesh_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="MESHAGENT_MESH",
    help="Join a mesh of nodes (a mesh file: trust domain, nodes and their pod CIDRs):"
    " connections to other nodes' pods go there over mutual TLS. Needs --certs. 'kube':"
    " the mesh from the Kubernetes API, the certificate from the identity service"
    " (deploy/mesh.yaml).",
)
@click.option(
    "--ktls",
    type=click.Choice(["auto", "off"]),
    default=AgentConfig.ktls,
    envvar="MESHAGENT_KTLS",
    help="The mesh hop's bytes: auto, the kernel's TLS and splice where a start-up self-test"
    " passes (TLS 1.2), else OpenSSL in the agent (TLS 1.3); off: always OpenSSL.",
)
@click.option(
    "--certs",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MESHAGENT_CERTS",
    help="This node's certificate directory (node.crt, node.key, ca.crt: meshagent ca"
    " issue); read again when the files change.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="MESHAGENT_POLICY",
    help="Authorization policy (AuthorizationPolicy documents, docs/policy.md): who may"
    " connect where, decided at connect(). Read again on SIGHUP and by `meshagent policy"
    " apply`; a malformed file is refused and the rules in force stay.",
)
@click.option(
    "--dump-bpf", is_flag=True, hidden=True, help="Print the exact BPF text and cflags, then exit."
)
@plan_options
@click.pass_obj
def run(
    app: App,
    cgroup_path: str | None,
    port: int,
    exclude_ports: str | None,
    exclude_cidrs: str | None,
    log_format: str,
    conns_max: int,
    metrics_addr: str,
    pod_conns_max: int,
    memory_max: str,
    redirect: str,
    without: tuple[str, ...],
    iptables_flavour: str | None,
    datapath: str,
    sockmap_sndbuf: int,
    sockmap_budget: int,
    sockmap_msg: bool,
    sockmap_replies: bool,
    takeover: str | None,
    after_handover: str,
    kube: str,
    kubeconfig: str | None,
    node_name: str | None,
    mesh_file: Path | None,
    ktls: str,
    certs: Path | None,
    policy_file: Path | None,
    dump_bpf: bool,
    cache_dir,
    bpf_cflags_extra: tuple[str, ...],
) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT.

    Compiles and attaches cgroup/connect4, cgroup/connect6 and sock_ops at the
    cgroup, serves the control API at STATE_DIR/agent.sock and forwards the
    connections of attached pods. On stop the pods stay attached (their new
    connects go direct) and the next agent takes them over; `meshagent
    cleanup` removes everything.
    """
    from meshagent.config import AgentConfig, bpf_cflags, parse_cidrs, parse_ports, parse_size

    cfg = AgentConfig(
        state_dir=app.state_dir,
        cgroup=cgroup_path,
        port=port,
        exclude_ports=parse_ports(exclude_ports),
        exclude_cidrs=parse_cidrs(exclude_cidrs),
        log_format=log_format,
        conns_max=conns_max,
        pod_conns_max=pod_conns_max,
        memory_max=parse_size(memory_max, "--memory-max"),
        metrics_addr=metrics_addr,
        datapath=datapath,
        sockmap_sndbuf=sockmap_sndbuf,
        sockmap_budget=sockmap_budget,
        sockmap_msg=sockmap_msg,
        sockmap_replies=sockmap_replies,
        redirect=redirect,
        without=tuple(without),
        iptables=iptables_flavour,
        extra_cflags=tuple(bpf_cflags_extra),
        cache_dir=cache_dir,
        takeover=takeover == "always",
        after_handover=after_handover,
        kube=kube,
        kubeconfig=kubeconfig,
        node_name=node_name,
        mesh=mesh_file,
        certs=certs,
        policy=policy_file,
        ktls=ktls,
    )
    if str(mesh_file) == "kube":
        from meshagent.errors import MeshError

        if kube == "off":
            raise MeshError("--mesh kube needs the API (--kube auto or on)")
        import dataclasses

        # The agent writes its own certificate there (mesh/enroll.py).
        cfg = dataclasses.replace(cfg, certs=certs or app.state_dir / "mesh-certs")
    elif (mesh_file is None) != (certs is None):
        from meshagent.errors import MeshError

        raise MeshError("--mesh and --certs go together: a mesh needs this node's certificate")
    from meshagent import kernel

    if without:
        kernel.check_feature_names(tuple(without))
    if dump_bpf:
        from meshagent.bpf import render_source

        click.echo("// cflags: " + " ".join(bpf_cflags(cfg)))
        click.echo(render_source(), nl=False)
        return
    require_root("meshagent run")
    from meshagent.agent import run as run_agent

    if takeover == "auto":
        from dataclasses import replace

        from meshagent.client import agent_running

        cfg = replace(cfg, takeover=agent_running(cfg.socket_path))
    run_agent(cfg)


ATTACH_EPILOG = """\b
Examples:
  meshagent attach client                        # a standalone pod
  meshagent attach client --redirect iptables
  meshagent attach client --mode kernel          # direct: the kernel decides and counts
  meshagent attach default/web                   # a Kubernetes pod on this node
  meshagent attach default/web --pid 4242        # found by one of its processes
  meshagent attach default/web --netns /var/run/netns/cni-1234
"""


@click.command(epilog=ATTACH_EPILOG)
@click.argument("pod")
@click.option(
    "--redirect",
    type=click.Choice(values(Backend)),
    show_default="the agent's",
    help="This pod's redirect backend.",
)
@click.option(
    "--mode",
    type=click.Choice(values(PodMode)),
    show_default="forward",
    help="forward: every connection through the forwarder. kernel: direct (policy, trace and"
    " per-connection accounting in the kernel); forwarded only to other nodes' pods and pods"
    " with ingress rules. Given for an attached pod, changes its mode.",
)
@click.option("--netns", "netns_path", help="The pod's network namespace: a path, or a name.")
@click.option("--pid", type=int, help="A process of the pod: its network namespace is the pod's.")
@click.pass_obj
def attach(
    app: App, pod: str, redirect: str | None, mode: str | None, netns_path: str | None,
    pid: int | None,
) -> None:  # fmt: skip
    """Steer POD's outbound TCP through the running agent's forwarder.

    POD is a standalone pod's NAME, or NAMESPACE/NAME of a Kubernetes pod on
    this node (found by its CNI record, else by the kubelet's cgroup layout
    and the pod's UID from the API server), or any name with --netns/--pid.
    """
    from meshagent.client import request
    from meshagent.pods.resolve import check_name

    check_name(pod)
    args: dict = {"redirect": redirect} if redirect else {}
    if mode:
        args["mode"] = mode
    if netns_path:
        args["netns"] = netns_path
    if pid is not None:
        args["pid"] = pid
    reply = request(app.socket_path, "attach", pod=pod, **args)
    state = "was already attached" if reply.get("already") else "attached"
    kernel = reply.get("mode") == "kernel"
    how = f"{reply['backend']}, kernel mode" if kernel else reply["backend"]
    click.echo(f"pod {pod} {state} ({how})")


@click.command(epilog="\b\nExample:\n  meshagent detach client")
@click.argument("pod")
@click.pass_obj
def detach(app: App, pod: str) -> None:
    """Stop steering POD's new connections; open ones finish as they are."""
    from meshagent.client import request

    request(app.socket_path, "detach", pod=pod)
    click.echo(f"pod {pod} detached")


@click.command(epilog="\b\nExamples:\n  meshagent status\n  meshagent status -o json | jq .pods")
@output_option("the status reply, with every connection")
@click.option("--connections", is_flag=True, help="Also list recent and live connections.")
@click.pass_obj
def status(app: App, output: str, connections: bool) -> None:
    """Attached pods, their counters, the backend and kernel features."""
    from meshagent.client import request

    reply = request(app.socket_path, "status")
    if connections or output == "json":
        reply["connections"] = request(app.socket_path, "connections")["connections"]
    if output == "json":
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(
        f"agent pid {reply['pid']}  backend {reply['backend']}  datapath {reply['datapath']}"
        f"  port {reply['port']}"
    )
    click.echo(f"backend: {reply['backend_reason']}")
    click.echo(f"datapath: {reply['datapath_reason']}")
    click.echo(f"cgroup {reply['cgroup']}  kernel {reply['kernel']}")
    click.echo(
        f"agent: up {reply['uptime_seconds']:.0f}s, RSS {reply['rss_bytes'] / 2**20:.1f} MiB,"
        f" {reply['open_fds']} fds" + (f", took over pods {', '.join(reply['adopted_pods'])}"
                                       if reply["adopted_pods"] else "")
    )  # fmt: skip
    click.echo("features: " + ", ".join(reply["kernel_features"]))
    if not reply["pods"]:
        click.echo("no pods attached")
    else:
        click.echo(
            f"{'POD':16} {'BACKEND':8} {'MODE':7} {'CONNS':>7} {'ACTIVE':>6} {'OUT':>12}"
            f" {'IN':>12} {'ERR':>5}"
        )
        for pod in reply["pods"]:
            errors = pod["no_orig_dst"] + pod["upstream_errors"]
            click.echo(
                f"{pod['name']:16} {pod['backend']:8} {pod.get('mode', 'forward'):7}"
                f" {pod['connections_total']:7} {pod['connections_active']:6}"
                f" {pod['bytes_out']:12} {pod['bytes_in']:12} {errors:5}"
            )
        for pod in reply["pods"]:
            if pod.get("mode_reason", "").startswith("kernel asked"):
                click.echo(f"  {pod['name']}: {pod['mode_reason']}")
    mesh = reply.get("mesh")
    if mesh:
        cert = mesh["certificate"]
        click.echo(
            f"mesh: node {mesh['node']} of {mesh['trust_domain']} ({len(mesh['nodes'])} nodes),"
            f" {mesh['hops']} hops open; certificate {cert['identity']} until {cert['not_after']}"
        )
        for pod in reply["pods"]:
            info = pod.get("mesh") or {}
            where = f"takes hops on {info['inbound']}" if info.get("inbound") else info.get("error")
            click.echo(f"  {pod['name']}: {info.get('identity')} {where}")
        done = ", ".join(f"{k}={v}" for k, v in mesh["handshakes"].items())
        click.echo(f"  handshakes: {done or 'none yet'}")
        kernel = mesh.get("kernel_tls") or {}
        how = "kernel TLS, spliced" if kernel.get("on") else "OpenSSL in the agent"
        click.echo(f"  the hop's bytes: {how} ({kernel.get('why')})")
    policy = reply.get("policy")
    if policy and policy.get("policies"):
        click.echo(f"policy: version {policy['version']} from {policy['source']},"
                   f" {len(policy['policies'])} policies, {policy['rules']} rules"
                   f" ({policy['refused']} refused)")  # fmt: skip
    decisions = ", ".join(f"{k}={sum(v.values())}" for k, v in reply["decisions"].items())
    click.echo(f"kernel decisions: {decisions or 'none yet'}")
    for conn in reply.get("connections", []):
        hop = conn.get("mtls") or {}
        via = ""
        if hop.get("direction") == "out":
            via = f" mtls to {hop.get('node')}"
        elif hop.get("direction") == "in":
            via = f" mtls from {hop.get('source') or hop.get('peer')}"
        by = f" closed by {conn['closed_by']}" if conn.get("closed_by") else ""
        click.echo(
            f"  {conn['pod']:12} {conn['client']:>22} -> {conn['orig_dst']:22} {conn['state']:10}"
            f" {conn.get('datapath', ''):8} out={conn['bytes_out']} in={conn['bytes_in']}{by}{via}"
        )


DATAPATH_EPILOG = """\b
Examples:
  meshagent datapath                 # which one, and why
  meshagent datapath set copy        # the kill switch: new connections copy in userspace
  meshagent datapath set sockmap
"""


@click.group(invoke_without_command=True, epilog=DATAPATH_EPILOG)
@output_option("the data path and why")
@click.pass_context
def datapath(ctx: click.Context, output: str) -> None:
    """Show or switch the data path used for new connections."""
    if ctx.invoked_subcommand is not None:
        return
    from meshagent.client import request

    app: App = ctx.obj
    reply = request(app.socket_path, "datapath")
    if output == "json":
        click.echo(json.dumps(reply, indent=2))
    else:
        click.echo(f"{reply['datapath']}: {reply['reason']}")


@datapath.command(
    name="set",
    epilog="\b\nExamples:\n  meshagent datapath set splice\n"
    "  meshagent datapath set sockmap --no-msg",
)
@click.argument("mode", type=click.Choice(values(DataPathMode)))
@click.option(
    "--msg/--no-msg",
    default=None,
    show_default="unchanged",
    help="sockmap only: the sk_msg fast path for pods' sends on or off.",
)
@click.option(
    "--replies/--no-replies",
    default=None,
    show_default="unchanged",
    help="sockmap with sk_msg only: a same-node server's replies straight into the pod's"
    " socket (see run --sockmap-replies).",
)
@click.pass_obj
def datapath_set(app: App, mode: str, msg: bool | None, replies: bool | None) -> None:
    """Use MODE for new connections; open ones keep theirs."""
    from meshagent.client import request

    extra = {key: value for key, value in (("msg", msg), ("replies", replies))
             if value is not None}  # fmt: skip
    request(app.socket_path, "datapath", set=mode, **extra)
    notes = [f"{name} {'on' if value else 'off'}" for name, value in
             (("sk_msg", msg), ("replies into the pod", replies)) if value is not None]  # fmt: skip
    note = f" ({', '.join(notes)})" if notes else ""
    click.echo(f"data path {mode} for new connections{note}")


@click.command(
    epilog="\b\nExamples:\n  meshagent cleanup\n  meshagent cleanup --cache -o json\n"
    "  meshagent cleanup --cni-records   # deploy/cleanup.yaml, after the DaemonSet"
)
@click.option("--cache", is_flag=True, help="Also remove the compiled BPF objects.")
@click.option(
    "--cni-records",
    is_flag=True,
    help="Also the CNI plugin's records of pods, and the state dir once empty (uninstall).",
)
@cache_dir_option
@output_option("what was removed")
@click.pass_obj
def cleanup(app: App, cache: bool, cni_records: bool, cache_dir: Path, output: str) -> None:
    """Remove everything a stopped agent left for its successor (uninstall).

    A stopped agent keeps its pods attached: pinned BPF maps, programs and
    cgroup links, the pods' iptables rules, STATE_DIR/attached.json. This
    removes them all (and with --cache the compiled BPF objects). Refused
    while an agent runs on the state dir.
    """
    require_root("meshagent cleanup")
    from meshagent.cleanup import cleanup as run_cleanup

    removed = run_cleanup(app.state_dir, cache_dir if cache else None, cni_records)
    if output == "json":
        click.echo(json.dumps({"removed": removed}))
        return
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing to remove")


@click.command(
    epilog="\b\nExamples:\n  meshagent retire --timeout 60   # deploy/daemonset.yaml's preStop"
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the new pod's agent to take over.",
)
@click.pass_obj
def retire(app: App, timeout: float) -> None:
    """Hand this node over to a new agent pod (the DaemonSet's preStop).

    Takes this pod (POD_NAME, POD_NAMESPACE) out of its DaemonSet, so that
    the DaemonSet starts a pod of its current template on the node at once,
    and waits until that pod's agent (run --takeover=auto) has taken over:
    an upgrade or a `kubectl delete pod` then ends no connection. Returns at
    once when the DaemonSet is being deleted. Always exits 0: the outcome is
    one line.
    """
    from meshagent.kube.retire import retire as run_retire

    click.echo(run_retire(app.socket_path, timeout, click.echo))


def register(cli: click.Group) -> None:
    for command in (run, attach, detach, status, datapath, cleanup, retire):
        cli.add_command(command)
