# meshagent: `make demo` and `make test` work on a fresh Debian bookworm as root.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test unit lint bench bench-mesh bench-mesh-profile bench-policy bench-kernel bench-handoff bench-scrape bench-footprint soak clean test-kernels test-vagrant kube-prepare bench-profile bench-syscalls bench-pycalls bench-conn-cost bench-budget-cost cluster cluster-down

# The kernels `make test` also runs the kernel-matrix suite on, in QEMU
# guests (vagrant/); `make test-kernels` runs it on every kernel of
# vagrant/kernels. TEST_KERNELS= (empty) skips the guests.
TEST_KERNELS ?= 5.10.0-32-amd64
# The part of the kernel-matrix suite `make test` runs there: what differs
# by kernel (steering, data paths, the plan, the CLI, restarts, trace).
# The mesh's and back-pressure's files run in `make test-kernels` (on
# 5.10 the hop is OpenSSL, as on this host). Empty: all of it.
TEST_KERNEL_TESTS ?= tests/e2e/test_cli.py tests/integration/test_datapaths.py \
	tests/integration/test_http.py tests/integration/test_plan_kernel.py \
	tests/integration/test_restart.py tests/integration/test_root_attach.py \
	tests/integration/test_steering.py tests/integration/test_trace.py

bootstrap:
	scripts/bootstrap

demo: bootstrap
	$(VENV)/bin/meshagent demo

# The host suite and the guests run side by side (scripts/test-all).
test: bootstrap
	$(if $(strip $(TEST_KERNELS)),vagrant/prepare $(TEST_KERNELS))
	kube/prepare
	TEST_KERNEL_TESTS="$(TEST_KERNEL_TESTS)" scripts/test-all $(TEST_KERNELS)

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

# The kernel-matrix suite in Vagrant VMs (libvirt, software emulation): a box
# per kernel built from Debian's packages, `vagrant up` provisioned by
# scripts/bootstrap, the suite over `vagrant ssh`, `vagrant destroy`
# (vagrant/test-vagrant). Slow: not part of `make test`. VAGRANT_KERNELS
# picks kernels of vagrant/kernels (default: all).
test-vagrant:
	VAGRANT_KERNELS="$(VAGRANT_KERNELS)" vagrant/test-vagrant

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

bench-mesh-profile: bootstrap
	scripts/bootstrap bench
	$(PY) bench/mesh_profile.py

bench-policy: bootstrap
	scripts/bootstrap bench
	$(PY) bench/policy.py

bench-handoff: bootstrap
	scripts/bootstrap bench
	$(PY) bench/handoff.py

bench-kernel: bootstrap
	scripts/bootstrap bench
	BENCH_PATHS="meshagent kernel" BENCH_RESULT=kernel-mode $(PY) bench/run.py

bench-scrape: bootstrap
	$(PY) bench/scrape.py

soak: bootstrap
	$(PY) bench/soak.py

# Where the cycles go: perf (whole machine) and py-spy (the agent) under redis load.
bench-profile: bootstrap
	scripts/bootstrap bench
	$(PY) bench/profile.py

bench-syscalls: bootstrap
	scripts/bootstrap bench
	$(PY) bench/syscalls.py

# Python calls the agent's loop makes per request (cProfile counts; same
# load as bench-syscalls): bench/results/pycalls.json.
bench-pycalls: bootstrap
	scripts/bootstrap bench
	$(PY) bench/pycalls.py

bench-conn-cost: bootstrap
	scripts/bootstrap bench
	$(PY) bench/conn_cost.py

bench-budget-cost: bootstrap
	$(PY) bench/budget_cost.py

bench-footprint: bootstrap
	$(PY) bench/footprint.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
