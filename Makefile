# meshagent: `make demo` and `make test` work on a fresh Debian bookworm as root.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test unit lint bench bench-mesh bench-scrape bench-footprint soak clean test-kernels kube-prepare bench-profile cluster cluster-down

# The kernels `make test` also runs the kernel-matrix suite on, in QEMU
# guests (vagrant/); `make test-kernels` runs it on every kernel of
# vagrant/kernels. TEST_KERNELS= (empty) skips the guests.
TEST_KERNELS ?= 5.10.0-32-amd64

bootstrap:
	scripts/bootstrap

demo: bootstrap
	$(VENV)/bin/meshagent demo

# The host suite and the guests run side by side (scripts/test-all).
test: bootstrap
	$(if $(strip $(TEST_KERNELS)),vagrant/prepare $(TEST_KERNELS))
	kube/prepare
	scripts/test-all $(TEST_KERNELS)

# The Kubernetes tests' parts (API server, images, CRI stubs): `make test` runs it.
kube-prepare: bootstrap
	kube/prepare

# A one-node Kubernetes cluster with a real kubelet on this machine
# (kube/cluster; docs/install-kubernetes.md#a-cluster-on-this-machine).
cluster: kube-prepare
	kube/cluster up

cluster-down:
	kube/cluster down

test-kernels: bootstrap
	vagrant/test-kernels

unit: bootstrap
	$(PY) -m pytest tests/unit -q

lint: bootstrap
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench

bench: bootstrap
	scripts/bootstrap bench
	$(PY) bench/run.py

bench-mesh: bootstrap
	scripts/bootstrap bench
	$(PY) bench/mesh.py

bench-scrape: bootstrap
	$(PY) bench/scrape.py

soak: bootstrap
	$(PY) bench/soak.py

# Where the cycles go: perf (whole machine) and py-spy (the agent) under redis load.
bench-profile: bootstrap
	scripts/bootstrap bench
	$(PY) bench/profile.py

bench-footprint: bootstrap
	$(PY) bench/footprint.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
