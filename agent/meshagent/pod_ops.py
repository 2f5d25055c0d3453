"""The control requests that attach and detach pods: `attach` and `detach`
(the CLI), `cni-add` and `cni-del` (the chained CNI plugin)."""

from __future__ import annotations

from meshagent.api import Handler, Reply, Request, reply_of
from meshagent.attachments import Attachments
from meshagent.kube.autoattach import KubePods
from meshagent.modes import Backend, PodMode
from meshagent.pods.kubelet import split_name


def pod_handlers(pods: Attachments, kube: KubePods) -> dict[str, Handler]:
    def attach(request: Request) -> Reply:
        redirect = request.choice("redirect", Backend, optional=True)
        return reply_of(
            pods.attach(
                request.text("pod"),
                redirect,
                request.optional_text("netns"),
                request.optional_int("pid"),
                mode=request.choice("mode", PodMode, optional=True),
            )
        )

    def detach(request: Request) -> Reply:
        return reply_of(pods.detach(request.text("pod")))

    def cni_add(request: Request) -> Reply:
        return reply_of(kube.cni_add(_kube_name(request)))

    def cni_del(request: Request) -> Reply:
        return reply_of(kube.cni_del(_kube_name(request)))

    return {"attach": attach, "detach": detach, "cni-add": cni_add, "cni-del": cni_del}


def _kube_name(request: Request) -> str:
    """NAMESPACE/NAME, or a one-line error."""
    name = request.text("pod")
    split_name(name)
    return name
