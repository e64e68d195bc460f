# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Images: one registry prefix and one tag, used by `make images` and written into the
# compiled pipeline and the kustomize overlays (see images/ and manifests/).
include images/versions.env   # REGISTRY, TAG, TF_VERSION; `make images REGISTRY=.. TAG=..` overrides
WORKDIR  ?= demo

.PHONY: demo test install pipeline images push manifests clean tools cluster cluster-down

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m resnet_imagenet run-local --workdir $(WORKDIR)

test: $(STAMP) tools
	$(PY) -m pytest -q --durations=15

# The Go-built control plane the Kubernetes tests run against (tools/versions.env pins it): built
# once per machine into ~/.cache/resnet-imagenet/bin, a no-op afterwards.
tools:
	tools/build.sh

# The same control plane by hand, for kubectl: `make cluster`, then the printed export line.
CLUSTER_DIR ?= .cluster
cluster: $(STAMP) tools
	$(PY) -m tests.support.cluster up $(CLUSTER_DIR)

cluster-down:
	$(PY) -m tests.support.cluster down $(CLUSTER_DIR)

pipeline: $(STAMP)
	RESNET_IMAGENET_REGISTRY=$(REGISTRY) RESNET_IMAGENET_TAG=$(TAG) $(PY) compile_pipeline.py

images:
	docker build -f images/trainer/Dockerfile --build-arg TF_VERSION=$(TF_VERSION) -t $(REGISTRY)/resnet-imagenet-trainer:$(TAG) .
	docker build -f images/launcher/Dockerfile --build-arg TF_VERSION=$(TF_VERSION) -t $(REGISTRY)/resnet-imagenet-launcher:$(TAG) .

push: images
	docker push $(REGISTRY)/resnet-imagenet-trainer:$(TAG)
	docker push $(REGISTRY)/resnet-imagenet-launcher:$(TAG)

manifests: $(STAMP)
	$(PY) manifests/generate.py

clean:
	rm -rf $(VENV) $(WORKDIR) build *.egg-info .pytest_cache $(CLUSTER_DIR)
