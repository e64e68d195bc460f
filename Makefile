# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Images: one registry prefix and one tag, used by `make images` and written into the
# compiled pipeline and the kustomize overlays (see images/ and manifests/).
include images/versions.env   # REGISTRY, TAG, TF_VERSION; `make images REGISTRY=.. TAG=..` overrides
WORKDIR  ?= demo

# Compile-time settings of the pipeline (compile_pipeline.py --help): the KFP backend it is for
# (2.17: 2.17.0 or newer; 2.14: 2.14.0 to 2.16.x) and, for clusters without Workload Identity,
# the Secret with the bucket key (the generic overlay's: resnet-imagenet-gcp-key).
KFP_BACKEND       ?= 2.17
BUCKET_KEY_SECRET ?=
PIPELINE_FLAGS    := --kfp-backend $(KFP_BACKEND) $(if $(BUCKET_KEY_SECRET),--bucket-key-secret $(BUCKET_KEY_SECRET))

.PHONY: demo test install pipeline pipeline-check images push manifests clean tools cluster cluster-down

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m resnet_imagenet run-local --workdir $(WORKDIR)

# One pytest worker per core (at most 4: each holds TensorFlow), each running whole groups of
# tests (tests/conftest.py); --durations lists the slowest tests at the end.
test: $(STAMP) tools
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadgroup --durations=15

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
	RESNET_IMAGENET_REGISTRY=$(REGISTRY) RESNET_IMAGENET_TAG=$(TAG) $(PY) compile_pipeline.py $(PIPELINE_FLAGS)

# Compile, the KFP backend's upload checks (each release the YAML is for), one line per step.
pipeline-check: $(STAMP)
	RESNET_IMAGENET_REGISTRY=$(REGISTRY) RESNET_IMAGENET_TAG=$(TAG) $(PY) pipeline_check.py $(PIPELINE_FLAGS)

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
