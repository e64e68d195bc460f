"""The cluster backends behind one interface: each implements all of ClusterBackend, the
lifecycle reaches them only through it, and each has its own options on a shared base."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest
from kubernetes import client

from resnet_imagenet.launch import cli, options, tfjob, trainjob
from resnet_imagenet.launch.backend import ClusterBackend
from tests.support.imports import imported_modules

LAUNCH = Path(cli.__file__).parent
BACKENDS = [tfjob.BACKEND, trainjob.BACKEND]
TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model"]
OPTIONS = {"tfjob": tfjob.TFJobOptions, "trainjob": trainjob.TrainJobOptions}
# The condition type each controller sets when the job succeeds.
SUCCESS = {"tfjob": "Succeeded", "trainjob": "Complete"}


def imports_any(path: Path, modules: set[str]) -> bool:
    """Whether the module at ``path`` imports one of ``modules`` or something inside one."""
    module = ".".join(path.relative_to(LAUNCH.parents[1]).with_suffix("").parts)
    return any(name == m or name.startswith(m + ".")
               for _, name in imported_modules(path.read_text(), module) for m in modules)


def test_the_cli_serves_exactly_the_backends_that_exist():
    assert cli.CLUSTER_BACKENDS == {"tfjob": tfjob.BACKEND, "trainjob": trainjob.BACKEND}
    assert set(cli.BACKENDS) == {*cli.CLUSTER_BACKENDS, "local"}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_each_backend_implements_the_whole_interface(backend):
    cls = type(backend)
    assert isinstance(backend, ClusterBackend) and not inspect.isabstract(cls)
    for method in ClusterBackend.__abstractmethods__:
        assert getattr(cls, method) is not getattr(ClusterBackend, method), method
    for attribute in ClusterBackend.__annotations__:
        value = getattr(cls, attribute, None)
        assert value, f"{cls.__name__}.{attribute} is not set"
    assert all(isinstance(c, str) and c for c in backend.containers)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_each_backends_manifest_and_status_agree_with_what_it_declares(backend):
    opts = OPTIONS[backend.name](name="resnet50", namespace="ml", train_args=TRAIN, workers=2)
    job = backend.manifest(opts)
    assert (job["apiVersion"], job["kind"]) == (f"{backend.group}/{backend.version}",
                                                backend.kind)
    assert job["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION] == \
        options.spec_hash(job["spec"])
    assert not backend.finished(job) and backend.progress(job.get("status") or {}) is None

    done = {**job, "status": {"conditions": [{"type": SUCCESS[backend.name], "status": "True"}]}}
    assert backend.succeeded(done) and backend.finished(done) and backend.failure(done) is None
    failed = {**job, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    assert not backend.succeeded(failed) and backend.finished(failed)
    assert backend.failure(failed)["reason"] == "BackoffLimitExceeded"
    assert "resnet50" in backend.pod_selector("resnet50")
    unlabelled = client.V1Pod(metadata=client.V1ObjectMeta(name="x", labels=None))
    assert backend.replica_name(unlabelled) == "pod-?"


def test_each_backend_has_its_own_options_on_the_shared_base():
    assert issubclass(tfjob.TFJobOptions, options.ClusterOptions)
    assert issubclass(trainjob.TrainJobOptions, options.ClusterOptions)
    assert not issubclass(trainjob.TrainJobOptions, tfjob.TFJobOptions)
    assert not issubclass(tfjob.TFJobOptions, trainjob.TrainJobOptions)
    tfjob_only = ({f.name for f in dataclasses.fields(tfjob.TFJobOptions)}
                  - {f.name for f in dataclasses.fields(trainjob.TrainJobOptions)})
    assert set(cli.RUNTIME_OWNED) <= tfjob_only


def test_the_lifecycle_never_imports_a_backend():
    backend_modules = {"resnet_imagenet.launch.tfjob", "resnet_imagenet.launch.trainjob"}
    shared = [*sorted((LAUNCH / "lifecycle").glob("*.py")), LAUNCH / "backend.py",
              LAUNCH / "options.py"]
    assert len(shared) > 3
    for path in shared:
        assert not imports_any(path, backend_modules), path
    # Nor does one backend lean on the other.
    assert not imports_any(LAUNCH / "tfjob.py", {"resnet_imagenet.launch.trainjob"})
    assert not imports_any(LAUNCH / "trainjob.py", {"resnet_imagenet.launch.tfjob"})


def test_the_cli_groups_its_flags_by_backend():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert groups["tfjob backend"] == set(cli.RUNTIME_OWNED)
    assert {"image", "namespace", "name", "run_id", "kubeconfig", "start_timeout",
            "poll_interval", "log_tail"} <= groups["tfjob and trainjob backends"]
    (trainjob_group,) = [g for g in parser._action_groups if g.title == "trainjob backend"]
    assert trainjob.RUNTIME in trainjob_group.description  # no flags of its own: what it uses
    assert "trainjob backend:" in parser.format_help()


@pytest.mark.parametrize("backend", ["tfjob", "trainjob"])
def test_a_negative_api_outage_timeout_is_refused_in_one_line(backend, capsys):
    """Before any configuration is read or request sent: exit 2, one line naming the flag."""
    from resnet_imagenet import cli as main_cli

    status = main_cli.main(["launch", "--backend", backend, "--kubeconfig", "/nonexistent",
                            "--api-outage-timeout", "-1", "--",
                            "--data-dir", "gs://b/d", "--model-dir", "gs://b/m"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --api-outage-timeout -1: must be 0 (retry for ever) or more seconds"]

