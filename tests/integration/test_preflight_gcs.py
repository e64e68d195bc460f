"""Pre-flight of the pipeline's gs:// URIs, against the emulator behind an IAM policy proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from resnet_imagenet import preflight, storage
from resnet_imagenet.data import sample
from resnet_imagenet.errors import UserError
from tests.support.gcs import gcs_client
from tests.support.gcs_iam import PolicyProxy

pytestmark = pytest.mark.gcs


@pytest.fixture(scope="module")
def raw(gcs_server, tmp_path_factory) -> str:
    """A bucket holding the demo archives (uploaded straight, not through the policy)."""
    name = f"raw-{uuid.uuid4().hex[:12]}"
    gcs_client(gcs_server).create_bucket(name)
    local = tmp_path_factory.mktemp("archives") / "raw"
    sample.build(str(local), per_class=2, as_archives=True)
    bucket = gcs_client(gcs_server).bucket(name)
    for path in local.iterdir():
        bucket.blob(f"imagenet/{path.name}").upload_from_filename(str(path))
    return f"gs://{name}/imagenet"


@pytest.fixture
def policy(gcs_emulator, monkeypatch):
    with PolicyProxy(gcs_emulator.endpoint) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        storage.reset()
        yield proxy
    storage.reset()


def uris(raw: str, out: str) -> dict:
    return {"raw_uri": raw, "tfrecord_uri": f"{out}/tfrecords", "model_uri": f"{out}/model",
            "export_uri": f"{out}/export"}


def check(given: dict) -> list[str]:
    return preflight.check_pipeline(
        raw=("raw_uri", given["raw_uri"]), tfrecord=("tfrecord_uri", given["tfrecord_uri"]),
        outputs={"model_uri": given["model_uri"], "export_uri": given["export_uri"]})


def objects(bucket_uri: str) -> list[str]:
    return sorted(b.name for b in gcs_client().bucket(bucket_uri[5:]).list_blobs())


def test_readable_input_and_writable_outputs_pass_and_leave_nothing(raw, gcs_bucket, policy):
    checked = check(uris(raw, gcs_bucket))
    assert checked == [f"raw_uri {raw}: readable",
                       f"tfrecord_uri {gcs_bucket}/tfrecords: writable",
                       f"model_uri {gcs_bucket}/model: writable",
                       f"export_uri {gcs_bucket}/export: writable"]
    assert objects(gcs_bucket) == []  # the probes are deleted


@pytest.mark.parametrize("permission, on, parameter, action", [
    ("storage.objects.create", "out", "tfrecord_uri", "writing a probe object"),
    ("storage.objects.delete", "out", "tfrecord_uri", "deleting the probe object"),
    ("storage.objects.list", "raw", "raw_uri", "listing the prefix"),
    ("storage.objects.get", "raw", "raw_uri", "reading ILSVRC2012_devkit_t12.tar.gz"),
])
def test_a_missing_permission_is_one_line_naming_uri_and_permission(raw, gcs_bucket, policy,
                                                                    permission, on, parameter,
                                                                    action):
    policy.deny(permission, raw.split("/")[2] if on == "raw" else gcs_bucket)
    given = uris(raw, gcs_bucket)
    with pytest.raises(UserError) as caught:
        check(given)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"pipeline parameter {parameter}={given[parameter]}: "
                              f"anonymous credentials lacks {permission} ({action}")
    assert "was refused: 403 Forbidden): grant it on the bucket" in message


def test_missing_bucket_empty_prefix_and_a_finished_dataset(raw, gcs_bucket, policy):
    with pytest.raises(UserError, match=r"raw_uri=gs://no-such-bucket-[0-9a-f]+/x: bucket "
                       r"gs://no-such-bucket-[0-9a-f]+ does not exist"):
        check(uris(f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/x", gcs_bucket))
    with pytest.raises(UserError, match=rf"raw_uri={gcs_bucket}/empty holds nothing"):
        check(uris(f"{gcs_bucket}/empty", gcs_bucket))
    # A finished dataset needs no raw data, and is only read: its bucket may be read-only.
    storage.write_text(f"{gcs_bucket}/tfrecords/manifest.json", "{}\n")
    policy.deny("storage.objects.create", gcs_bucket)
    policy.deny("storage.objects.get", raw.split("/")[2])
    checked = check({"raw_uri": raw, "tfrecord_uri": f"{gcs_bucket}/tfrecords",
                     "model_uri": "/local/model", "export_uri": "/local/export"})
    assert checked == [f"tfrecord_uri {gcs_bucket}/tfrecords: a finished dataset, readable"]


def test_the_validate_step_runs_the_preflight(raw, gcs_bucket, policy):
    from components.validate import validate_parameters

    policy.deny("storage.objects.create", gcs_bucket)
    with pytest.raises(UserError, match=r"^pipeline parameter data_model_uri=gs://.*/model: "
                       r"anonymous credentials lacks storage.objects.create"):
        validate_parameters.python_func(
            train_backend="tfjob", train_workers=2, train_gpus_per_worker=1,
            train_batch_size=64, train_steps=10, model_resnet_depth=50, model_num_classes=1000,
            model_image_size=224, tfrecord_tasks=2, tfrecord_shards_train=4,
            tfrecord_shards_validation=2, train_timeout_seconds=3600,
            train_timeout_max_seconds=604800, train_start_timeout_seconds=1800,
            train_gpu_tolerations=[], step_tolerations=[],
            train_extra_args=[],
            data_raw_uri=raw,
            data_tfrecord_uri=f"{raw.rsplit('/', 1)[0]}/tfrecords",  # writable: another bucket
            data_model_uri=f"{gcs_bucket}/model", data_export_uri=f"{gcs_bucket}/export")


def test_preflight_imports_no_tensorflow(raw, gcs_bucket):
    code = ("import sys; from resnet_imagenet import preflight; "
            f"print(len(preflight.check_pipeline(raw=('r', {raw!r}), tfrecord=('t', "
            f"{gcs_bucket!r} + '/t'), outputs={{'m': 'm'}}))); "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr


# --- the TF commands: their gs:// flags checked before TensorFlow is imported ----------------

RUN_COMMANDS = """
import json, sys
from resnet_imagenet import cli
for argv in json.loads(sys.argv[1]):
    print(cli.main(argv), flush=True)
print('tensorflow' in sys.modules)
"""


def run_commands(commands: list[list[str]], env: dict) -> tuple[list[str], list[str]]:
    """Each command through the CLI in one fresh interpreter: (its exit codes and whether
    TensorFlow got imported, its stderr's error lines)."""
    import json

    result = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)],
                            capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return result.stdout.split(), errors


def test_a_tf_command_without_access_stops_before_tensorflow(raw, gcs_bucket, policy):
    policy.deny("storage.objects.create", gcs_bucket)
    # Inputs that read (the data need not be what train or export want: access is all the
    # pre-flight checks), outputs that cannot be written.
    out, errors = run_commands([
        ["train", "--data-dir", raw, "--model-dir", f"{gcs_bucket}/model"],
        ["export", "--model-dir", raw, "--export-dir", f"{gcs_bucket}/export"],
    ], env=os.environ.copy())
    assert out == ["2", "2", "False"]
    assert errors == [
        f"error: {flag} {gcs_bucket}/{name}: anonymous credentials lacks storage.objects.create "
        "(writing a probe object was refused: 403 Forbidden): grant it on the bucket, or run "
        "as an identity that has it" for flag, name in (("--model-dir", "model"),
                                                        ("--export-dir", "export"))]
    assert objects(gcs_bucket) == []


def test_an_unreachable_storage_endpoint_is_one_line_within_the_bound(tmp_path):
    from resnet_imagenet.launch.local import free_ports

    (port,) = free_ports(1)  # nothing listens: every request is refused, and retried
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           preflight.TIMEOUT_ENV: "1"}
    out, errors = run_commands([
        ["train", "--data-dir", "gs://b/data", "--model-dir", "gs://b/model"],
        ["evaluate", "--data-dir", "gs://b/data", "--model-dir", "gs://b/model"],
        ["export", "--model-dir", "gs://b/model", "--export-dir", "gs://b/export"],
        ["predict", "--model", "gs://b/export", str(tmp_path / "x.jpg")],
        ["bench", "predict", "--model", "gs://b/export"],
    ], env=env)
    assert out == ["2"] * 5 + ["False"]
    bound = (": Google Cloud Storage did not answer within 1 s (RESNET_IMAGENET_PREFLIGHT_TIMEOUT):"
             " check this machine's network or proxy and its credentials (gcloud auth "
             "application-default login, GOOGLE_APPLICATION_CREDENTIALS or workload identity)")
    assert errors == [f"error: {flag}{bound}" for flag in (
        "--data-dir gs://b/data", "--data-dir gs://b/data", "--model-dir gs://b/model",
        "--model gs://b/export", "--model gs://b/export")]
