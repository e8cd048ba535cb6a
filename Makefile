# pve-vault-agent. `make help` lists the targets.
SHELL := /bin/bash
export GOTOOLCHAIN := local
export GOFLAGS := -mod=readonly

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
BIN     := bin/pve-vault-agent

.PHONY: help build test test-unit lint demo lab-bins clean

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

test: lab-bins lint ## install prerequisites, then every test (unit and lab) with the race detector
	go test -race -count=1 -timeout 40m ./...

demo: lab-bins build ## run the lifecycle against the local lab, narrated with timings
	go run ./internal/lab/demo -agent $(BIN)

clean: ## remove build output (the lab cache stays: see scripts/lab-bins.sh)
	rm -rf bin
