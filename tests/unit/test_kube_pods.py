"""KubePods, the reconciler of Kubernetes pods, with fake attachments: no
root, no API server. Finished pods are left alone; a pod that cannot be
attached yet is retried with a growing, capped wait ([S] item 14)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from meshagent.errors import MeshError
from meshagent.kube.autoattach import (
    LABEL,
    MODE_LABEL,
    RETRY_MAX_SECONDS,
    RETRY_SECONDS,
    KubePods,
    PodView,
)
from meshagent.pods.kubelet import CniStore


@dataclass
class Handle:
    mode: str = "forward"


@dataclass
class Entry:
    auto: bool = True
    draining: bool = False
    handle: Handle = field(default_factory=Handle)


class FakeAttachments:
    """Attaches once `found` holds the pod; counts every try."""

    def __init__(self) -> None:
        self.pods: dict[str, Entry] = {}
        self.busy: set[str] = set()
        self.found: set[str] = set()
        self.tries: list[str] = []

    def attach(self, name: str, auto: bool = False, mode=None) -> dict:
        self.tries.append(name)
        if name not in self.found:
            raise MeshError(f"pod {name}: no process in its cgroup names its netns")
        self.pods[name] = Entry(auto=auto, handle=Handle(mode.value if mode else "forward"))
        return {"pod": name, "attached": True}

    def set_mode(self, entry: Entry, mode) -> None:
        entry.handle.mode = mode.value

    def detach(self, name: str) -> dict:
        self.pods.pop(name)
        return {"pod": name, "detached": True}


@pytest.fixture
def kube(tmp_path):
    pods = KubePods(FakeAttachments(), CniStore(tmp_path))
    pods.watching = True
    return pods


def labelled(phase: str = "Running") -> PodView:
    return PodView(uid="1234-ab", labels={LABEL: "true"}, phase=phase)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_pod_is_never_tried_nor_retried(kube, phase):
    kube.replace_all({"jobs/done": labelled(phase)}, {})
    kube.retry_pending()
    assert kube.attachments.tries == [] and kube.pending == {}
    assert kube.wanted("jobs/done") == (False, f"finished ({phase})")


def test_a_pod_that_finishes_while_attached_is_detached(kube):
    kube.attachments.found.add("jobs/run")
    kube.replace_all({"jobs/run": labelled()}, {})
    assert "jobs/run" in kube.attachments.pods
    kube.pod_event("MODIFIED", "jobs/run", labelled("Succeeded"))
    assert "jobs/run" not in kube.attachments.pods


def test_a_pending_pod_that_finishes_is_no_longer_retried(kube):
    kube.replace_all({"jobs/run": labelled("Pending")}, {})
    assert "jobs/run" in kube.pending
    kube.pod_event("MODIFIED", "jobs/run", labelled("Failed"))
    assert kube.pending == {} and kube.backoff == {}


def test_retries_back_off_doubling_up_to_a_cap(kube):
    kube.replace_all({"default/web": labelled()}, {})
    waits = []
    for _ in range(10):  # bounded: each round makes the retry due and runs it
        waits.append(kube.backoff["default/web"])
        kube.pending["default/web"] = 0.0
        kube.retry_pending()
    assert len(kube.attachments.tries) == 11
    assert waits[0] == RETRY_SECONDS * 2 and waits[1] == RETRY_SECONDS * 4
    assert waits == sorted(waits) and waits[-1] == RETRY_MAX_SECONDS
    kube.attachments.found.add("default/web")  # the sandbox shows up
    kube.pending["default/web"] = 0.0
    kube.retry_pending()
    assert "default/web" in kube.attachments.pods
    assert kube.pending == {} and kube.backoff == {} and kube.errors == {}


def test_a_retry_not_yet_due_is_not_tried(kube):
    kube.replace_all({"default/web": labelled()}, {})
    kube.retry_pending()  # the first wait has not passed
    assert kube.attachments.tries == ["default/web"]


def test_the_api_watch_reports_the_phase():
    pytest.importorskip("lightkube")
    from lightkube.models.core_v1 import PodStatus
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod

    from meshagent.kube.watch import _pod_view

    meta = ObjectMeta(name="x", namespace="jobs", uid="1234-ab", labels={LABEL: "true"})
    assert _pod_view(Pod(metadata=meta, status=PodStatus(phase="Succeeded"))).phase == "Succeeded"
    assert _pod_view(Pod(metadata=meta)).phase == ""


def test_cni_add_says_undecided_until_the_api_view_has_the_pod(kube):
    """A plugin with whenNoAgent "wait" retries an undecided ADD: before the
    first full list, or while the watch has not seen the pod, the labels may
    still want it."""
    assert kube.cni_add("shop/web")["undecided"] is True  # not synced
    kube.replace_all({}, {"shop": {LABEL: "true"}})
    assert kube.cni_add("shop/web")["undecided"] is True  # synced, pod unseen
    kube.pod_event("ADDED", "shop/other", PodView(uid="9", labels={LABEL: "false"},
                                                  phase="Pending"))  # fmt: skip
    answer = kube.cni_add("shop/other")
    assert answer["attached"] is False and "undecided" not in answer  # known: decided


def test_the_mode_label_picks_the_mode_at_attach_and_changes_it_in_place(kube):
    """meshagent.io/mode on the namespace, overridden by the pod's own; a
    value that is no mode is ignored."""
    kube.attachments.found.update({"shop/web", "shop/db"})
    web = PodView(uid="1", labels={LABEL: "true"}, phase="Running")
    db = PodView(uid="2", labels={LABEL: "true", MODE_LABEL: "forward"}, phase="Running")
    kube.replace_all({"shop/web": web, "shop/db": db}, {"shop": {MODE_LABEL: "kernel"}})
    pods = kube.attachments.pods
    assert (pods["shop/web"].handle.mode, pods["shop/db"].handle.mode) == ("kernel", "forward")
    kube.pod_event(
        "MODIFIED",
        "shop/db",
        PodView(uid="2", phase="Running", labels={LABEL: "true", MODE_LABEL: "kernel"}),
    )
    assert pods["shop/db"].handle.mode == "kernel"
    kube.pod_event(
        "MODIFIED",
        "shop/web",
        PodView(uid="1", phase="Running", labels={LABEL: "true", MODE_LABEL: "fast"}),
    )
    assert pods["shop/web"].handle.mode == "kernel"  # the namespace's, still
