# Two entry points for people: `make run` and `make test`. Both build .venv from scratch when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMTOOL := $(VENV)/tools/promtool

.PHONY: run test lint unit bench install clean crds tools docs guest cluster-build cluster-up cluster-down node-up node-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# promtool checks and unit-tests the chart's alert rules (tests/chart/test_monitoring.py):
# the binary alone from Debian's prometheus package, unpacked, never installed as a service.
$(PROMTOOL):
	rm -rf $(VENV)/tools/deb && mkdir -p $(VENV)/tools/deb
	cd $(VENV)/tools/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $(VENV)/tools/deb/prometheus_*.deb $(VENV)/tools/deb/root
	cp $(VENV)/tools/deb/root/usr/bin/promtool $@.tmp && mv $@.tmp $@
	rm -rf $(VENV)/tools/deb

tools: $(PROMTOOL)

# The cgroup-v2 guest the guest_v2 tests run in (tests/guest/run.py, docs/testing.md):
# Debian's linux-image-6.1 and busybox-static unpacked into .cache/guest/, qemu-system-x86
# installed when missing. A no-op when up to date.
guest: $(STAMP)
	$(PY) tests/guest/run.py --build

# The real control plane the Kubernetes tests run against (hack/cluster/, docs/testing.md):
# etcd, kube-apiserver, kube-controller-manager and kubectl built from pinned upstream Go
# modules into .cluster/bin, again only when the pins change. cluster-up starts one on
# 127.0.0.1 and writes .cluster/admin.kubeconfig; cluster-down stops it and deletes its data.
cluster-build:
	$(PYTHON) hack/cluster/controlplane.py build

cluster-up:
	$(PYTHON) hack/cluster/controlplane.py up

cluster-down:
	$(PYTHON) hack/node/node.py down
	$(PYTHON) hack/cluster/controlplane.py down

# This machine as a real Node of that control plane (hack/node/, docs/testing.md):
# containerd (built from its module), kubelet, kube-proxy and kube-scheduler (the control
# plane's pin), Debian's runc and CNI plugins, the images built here (no registry).
# node-down stops them and removes their containers, mounts, cgroups and network.
node-up: cluster-up
	$(PYTHON) hack/node/node.py up

node-down:
	$(PYTHON) hack/node/node.py down

run: $(STAMP)
	$(VENV)/bin/nodemem report
	$(VENV)/bin/nodemem apply -f examples/dev-shm-limit.yaml --dry-run

lint: $(STAMP)
	$(VENV)/bin/ruff check operator tests bench hack
	$(VENV)/bin/ruff format --check operator tests bench hack
	$(VENV)/bin/mypy --strict
	$(VENV)/bin/lint-imports

unit: $(STAMP) $(PROMTOOL) guest cluster-build
	$(PY) -m pytest

test: lint unit

bench: $(STAMP)
	$(PY) bench/scan.py
	$(PY) bench/processes.py
	$(PY) bench/cleanup.py
	$(PY) bench/exec_latency.py
	$(PY) bench/controller_scale.py
	$(PY) bench/agent_load.py
	$(PY) bench/cli_startup.py
	$(PY) bench/parsers.py

# The CRDs are generated from the pydantic models; the chart carries the same files.
crds: $(STAMP)
	$(VENV)/bin/nodemem crds --output-dir crds
	$(VENV)/bin/nodemem crds --output-dir charts/nodemem/crds

# docs/api.md's field reference is generated from the same models (tests/unit/test_docs.py).
docs: $(STAMP)
	$(PY) tests/api_reference.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache/guest
