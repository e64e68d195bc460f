# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Images: one registry prefix and one tag, used by `make images` and written into the
# compiled pipeline and the kustomize overlays (see images/ and manifests/).
include images/versions.env   # REGISTRY, TAG, TF_VERSION; `make images REGISTRY=.. TAG=..` overrides
WORKDIR  ?= demo

.PHONY: demo test install pipeline images push manifests clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m resnet_imagenet run-local --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

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
	rm -rf $(VENV) $(WORKDIR) build *.egg-info .pytest_cache
