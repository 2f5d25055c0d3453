"""The Vagrantfile cannot run here (no usable KVM, no Vagrant): Ruby checks
its syntax and evaluates it against a recording stand-in for Vagrant, so a
box without a provider, a provisioner that is not scripts/bootstrap or a
checkout synced without the project are caught."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
RUBY = shutil.which("ruby")
needs_ruby = pytest.mark.skipif(RUBY is None, reason="no ruby here (vagrant/prepare installs it)")


@pytest.fixture(scope="module")
def record() -> dict:
    out = subprocess.run(
        [RUBY, str(TOP / "tests/helpers/vagrantfile.rb"), str(TOP / "Vagrantfile")],
        capture_output=True, text=True, check=True, cwd=TOP,
    ).stdout  # fmt: skip
    return json.loads(out)


@needs_ruby
def test_vagrantfile_is_valid_ruby():
    proc = subprocess.run([RUBY, "-c", str(TOP / "Vagrantfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Syntax OK" in proc.stdout


@needs_ruby
def test_every_box_boots_another_kernel_with_both_providers(record):
    machines = [call["args"][0] for call in record["vm.define()"]]
    boxes = {name: record[f"vm.define.{name}.vm.box"] for name in machines}
    assert record["version"] == "2"
    # Debian 12, Ubuntu 24.04 and a Fedora: three distributions' kernels.
    assert {box.split("/")[-1].split("-")[0].rstrip("0123456789.") for box in boxes.values()} >= {
        "bookworm", "ubuntu", "fedora",
    }  # fmt: skip
    autostarted = [c["args"][0] for c in record["vm.define()"] if c["options"].get("autostart")]
    assert len(autostarted) == 1, "one box comes up with a plain `vagrant up`"
    for name in machines:
        providers = [c["args"][0] for c in record[f"vm.define.{name}.vm.provider()"]]
        assert sorted(providers) == ["libvirt", "virtualbox"]
        for provider in providers:
            assert record[f"vm.define.{name}.vm.provider.{provider}.cpus"] >= 2
            assert record[f"vm.define.{name}.vm.provider.{provider}.memory"] >= 2048


@needs_ruby
def test_boxes_get_the_checkout_and_are_provisioned_by_bootstrap(record):
    for call in record["vm.define()"]:
        name = call["args"][0]
        folder = record[f"vm.define.{name}.vm.synced_folder()"][0]
        assert folder["args"] == [".", "/vagrant"]
        excluded = folder["options"].get("rsync__exclude", [])
        assert ".venv/" in excluded and "vagrant/.cache/" in excluded  # host-built, host-only
        (provision,) = record[f"vm.define.{name}.vm.provision()"]
        assert provision["options"]["type"] == "shell"
        assert provision["options"]["privileged"] is True
        assert "scripts/bootstrap" in provision["options"]["inline"]
    script = (TOP / "scripts/bootstrap").read_text()
    for distro in ("debian|ubuntu)", "fedora)"):
        assert distro in script, f"scripts/bootstrap has no case for {distro}"
