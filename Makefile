# pve-vault-agent. `make help` lists the targets.
SHELL := /bin/bash
export GOTOOLCHAIN := local
export GOFLAGS := -mod=readonly

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
BIN     := bin/pve-vault-agent

NFPM    := github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
# Debian versions start with a digit: the tag without its "v", or 0.0.0+<commit>.
DEB_VERSION ?= $(shell v=$$(git describe --tags --abbrev=0 2>/dev/null); if [ -n "$$v" ]; then echo "$${v\#v}"; else echo "0.0.0+$(COMMIT)"; fi)

.PHONY: help build test test-unit lint demo demo-adopt lab-bins clean install deb

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

build: ## static binary bin/pve-vault-agent (-trimpath, version from git)
	CGO_ENABLED=0 go build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/agent

lab-bins: ## install the lab's prerequisites (apt) and build Vault, etcd, Kubernetes into the cache
	bash scripts/lab-bins.sh

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	go vet ./...

test-unit: ## fast tests only (-short: no lab servers), with the race detector
	go test -race -short -count=1 ./...

test: lab-bins lint ## install prerequisites, then every test (unit and lab) with the race detector, then the package
	go test -race -count=1 -timeout 40m ./...
	bash scripts/test-deb.sh

demo: lab-bins build ## run the lifecycle against the local lab, narrated with timings
	go run ./internal/lab/demo -agent $(BIN)

demo-adopt: lab-bins build ## the second demo: a Vault set up by hand as the write-up does, adopted
	go run ./internal/lab/demo -agent $(BIN) -adopt

install: build ## binary, units, example config and credential directory under $(DESTDIR)
	install -D -m 0755 $(BIN) $(DESTDIR)/usr/bin/pve-vault-agent
	install -D -m 0644 -t $(DESTDIR)/lib/systemd/system systemd/pve-vault-agent.service systemd/pve-vault-agent-backup.service systemd/pve-vault-agent-backup.timer
	install -D -m 0644 configs/config.example.yaml $(DESTDIR)/usr/share/doc/pve-vault-agent/config.example.yaml
	install -D -m 0644 configs/values.example.yaml $(DESTDIR)/usr/share/doc/pve-vault-agent/values.example.yaml
	install -D -m 0644 README.md $(DESTDIR)/usr/share/doc/pve-vault-agent/README.md
	install -D -m 0644 -t $(DESTDIR)/usr/share/pve-vault-agent/prometheus packaging/prometheus/pve-vault-agent.rules.yml packaging/prometheus/pve-vault-agent.rules.test.yml
	install -D -m 0644 -t $(DESTDIR)/usr/share/pve-vault-agent/grafana packaging/grafana/pve-vault-agent.json
	install -d -m 0700 $(DESTDIR)/etc/pve-vault-agent $(DESTDIR)/etc/pve-vault-agent/credentials
	@echo "installed; nothing enabled or started: see README (Install on a Proxmox host)"

deb: build ## Debian package bin/pve-vault-agent_<version>_amd64.deb (nfpm, pinned)
	PVA_VERSION='$(DEB_VERSION)' GOFLAGS=-mod=mod go run $(NFPM) pkg --config packaging/nfpm.yaml --packager deb --target bin/

clean: ## remove build output (the lab cache stays: see scripts/lab-bins.sh)
	rm -rf bin
