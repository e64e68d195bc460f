"""Pipeline parameters: refused in the first step with a message naming the parameter, and
turned into command lines that the real subcommand parsers accept."""

from __future__ import annotations

import re

import pytest

from pipelines import params as pipeline_params
from resnet_imagenet import cli
from resnet_imagenet.errors import UserError

REFERENCE = dict(
    train_backend="tfjob", train_workers=4, train_gpus_per_worker=1, train_batch_size=256,
    train_steps=500_000, model_resnet_depth=50, model_num_classes=1000, model_image_size=224,
    tfrecord_tasks=16, tfrecord_shards_train=1024, tfrecord_shards_validation=128,
    train_timeout_seconds=7 * 24 * 3600, train_timeout_max_seconds=14 * 24 * 3600,
    uris={"data_raw_uri": "gs://b/raw", "data_tfrecord_uri": "gs://b/tfrecords",
          "data_model_uri": "gs://b/model", "data_export_uri": "gs://b/export"},
)


def refusal(**changes) -> str:
    with pytest.raises(UserError) as info:
        pipeline_params.validate(**{**REFERENCE, **changes})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_reference_recipe_is_valid():
    pipeline_params.validate(**REFERENCE)


def test_local_backend_trains_on_cpu_workers_and_local_paths():
    pipeline_params.validate(**{**REFERENCE, "train_backend": "local", "train_workers": 2,
                                "train_gpus_per_worker": 0, "train_batch_size": 64,
                                "train_timeout_seconds": 0,
                                "uris": {"data_tfrecord_uri": "/tmp/t",
                                         "data_model_uri": "/tmp/m"}})


def test_trainjob_backend_is_accepted_and_needs_object_storage_too():
    pipeline_params.validate(**{**REFERENCE, "train_backend": "trainjob"})
    message = refusal(train_backend="trainjob",
                      uris={**REFERENCE["uris"], "data_tfrecord_uri": "/mnt/t"})
    assert message.startswith("pipeline parameter data_tfrecord_uri='/mnt/t' is a local path, "
                              "which the TrainJob's pods cannot see")


@pytest.mark.parametrize("workers", [0, -3])
def test_workers_below_one(workers):
    assert refusal(train_workers=workers) == (
        f"pipeline parameter train_workers={workers} must be at least 1")


def test_batch_not_divisible_by_total_gpus():
    message = refusal(train_workers=4, train_gpus_per_worker=2, train_batch_size=250)
    assert message.startswith(
        "pipeline parameter train_batch_size=250 is not divisible by the 8 GPUs "
        "(train_workers=4 x train_gpus_per_worker=2)")
    assert "use e.g. 248" in message


def test_batch_not_divisible_by_cpu_workers():
    message = refusal(train_backend="local", train_workers=3, train_gpus_per_worker=0,
                      train_batch_size=64, uris={})
    assert "not divisible by the 3 CPU workers (train_gpus_per_worker=0)" in message


def test_unknown_backend():
    assert refusal(train_backend="kubernetes") == (
        "pipeline parameter train_backend='kubernetes' is unknown: use 'tfjob' or 'trainjob' "
        "or 'local'")


@pytest.mark.parametrize("changes, expected", [
    (dict(train_gpus_per_worker=-1), "train_gpus_per_worker=-1 must be at least 0"),
    (dict(model_resnet_depth=51), "model_resnet_depth=51 is not a ResNet depth"),
    (dict(train_steps=-1), "train_steps=-1 must be at least 0"),
    (dict(model_num_classes=0), "model_num_classes=0 must be at least 1"),
    (dict(tfrecord_tasks=2000), "tfrecord_tasks=2000 is more than the 1152 shards to write"),
    (dict(train_workers=2.5), "train_workers=2.5 must be an integer"),
    (dict(train_workers=True), "train_workers=True must be an integer, not a boolean"),
])
def test_other_parameters_are_named(changes, expected):
    assert expected in refusal(**changes)


@pytest.mark.parametrize("timeout", [0, 14 * 24 * 3600 + 1])
def test_a_cluster_training_timeout_must_end_before_the_train_steps_deadline(timeout):
    """The launcher has to time out (and delete the job) before the pod deadline kills it."""
    message = refusal(train_timeout_seconds=timeout)
    assert message.startswith(f"pipeline parameter train_timeout_seconds={timeout} is outside "
                              "1..1209600: the train step's pod deadline is 1213200 s")
    pipeline_params.validate(**{**REFERENCE, "train_timeout_seconds": 14 * 24 * 3600})


@pytest.mark.parametrize("backend, kind", [("tfjob", "TFJob"), ("trainjob", "TrainJob")])
def test_cluster_backends_need_object_storage_for_data_and_model(backend, kind):
    pipeline_params.validate(**{**REFERENCE, "train_backend": backend})
    message = refusal(train_backend=backend,
                      uris={**REFERENCE["uris"], "data_model_uri": "/mnt/model"})
    assert message == (f"pipeline parameter data_model_uri='/mnt/model' is a local path, which "
                       f"the {kind}'s pods cannot see: use object storage (gs://BUCKET/PATH) "
                       f"with the {backend} backend")


def test_uri_schemes_and_empty_uris():
    assert "unsupported URI scheme 's3://'" in refusal(
        uris={**REFERENCE["uris"], "data_raw_uri": "s3://b/raw"})
    assert refusal(uris={**REFERENCE["uris"], "data_export_uri": " "}) == (
        "pipeline parameter data_export_uri is empty: give a gs://BUCKET/PATH URI")


@pytest.mark.parametrize("toleration, flag", [
    ({"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
     "dedicated=ml:NoSchedule"),
    ({"key": "dedicated", "value": "ml"}, "dedicated=ml"),
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
     "nvidia.com/gpu:NoSchedule"),
    ({"key": "spot", "operator": "Exists"}, "spot"),
    # tolerationSeconds: how long a pod stays on a node that becomes unreachable, say
    ({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
      "tolerationSeconds": 600}, "node.kubernetes.io/unreachable:NoExecute:600"),
])
def test_one_toleration_format_becomes_the_launchers_flag(toleration, flag):
    assert pipeline_params.toleration_flag("train_gpu_tolerations", toleration) == flag
    # ... and the launcher's parser turns the flag back into the same toleration.
    from resnet_imagenet.launch import options

    expected = {"operator": "Equal" if "value" in toleration else "Exists", **toleration}
    assert options.parse_toleration(flag) == expected


@pytest.mark.parametrize("toleration, expected", [
    ("dedicated=ml:NoSchedule", "is not a toleration: give Kubernetes tolerations"),
    ({"key": "a", "value": "b", "seconds": 3}, "unknown toleration field(s) seconds"),
    ({"operator": "Exists"}, "it has no key"),
    ({"key": "a", "operator": "Exists", "value": "b"}, "operator Exists takes no value"),
    ({"key": "a", "operator": "Equal"}, "operator Equal needs a value"),
    ({"key": "a", "operator": "In", "value": "b"}, "operator 'In' is not Equal or Exists"),
    ({"key": "a", "value": "b", "effect": "Never"}, "effect 'Never' is not NoSchedule"),
    ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 60},
     "tolerationSeconds needs effect NoExecute"),
    ({"key": "a", "effect": "NoExecute", "tolerationSeconds": -5},
     "tolerationSeconds -5 is not a whole number of seconds"),
])
def test_bad_tolerations_are_refused_in_the_first_step(toleration, expected):
    message = refusal(tolerations={"step_tolerations": [toleration]})
    assert message.startswith("pipeline parameter step_tolerations: ")
    assert expected in message


def test_integral_floats_from_kfp_are_ints():
    # dsl.ParallelFor items and collected outputs can come back as JSON floats.
    assert pipeline_params.as_int("task_index", 3.0) == 3
    assert pipeline_params.task_indices(3.0) == [0, 1, 2]
    argv = pipeline_params.convert_argv(
        raw_uri="r", tfrecord_uri="t", train_shards=8.0, validation_shards=2, num_tasks=2.0,
        task_index=1.0, workers=1, seed=0)
    assert argv[argv.index("--task-index") + 1] == "1"
    assert argv[argv.index("--train-shards") + 1] == "8"


def parse(argv: list[str]):
    """Parse ``argv`` with the real parser of its subcommand."""
    parser, _ = cli.command_parser(argv[0])
    return parser.parse_args(argv[1:])


def test_convert_argv_is_accepted_by_convert():
    args = parse(pipeline_params.convert_argv(
        raw_uri="gs://b/raw", tfrecord_uri="gs://b/t", train_shards=1024,
        validation_shards=128, num_tasks=16, task_index=3, workers=8, seed=5))
    assert (args.raw_dir, args.output_dir, args.train_shards, args.validation_shards,
            args.num_tasks, args.task_index, args.workers, args.seed) == (
        "gs://b/raw", "gs://b/t", 1024, 128, 16, 3, 8, 5)
    final = parse(pipeline_params.finalize_argv("gs://b/t"))
    assert final.finalize and final.output_dir == "gs://b/t"


@pytest.mark.parametrize("backend", ["tfjob", "trainjob"])
def test_launch_argv_is_accepted_by_launch(backend):
    train = pipeline_params.train_argv(
        data_uri="gs://b/t", model_uri="gs://b/m", resnet_size=50, num_classes=1000,
        image_size=224,
        batch_size=256, train_steps=500_000, checkpoint_every=5000,
        extra=["--lr-schedule", "cosine"])
    argv = pipeline_params.launch_argv(
        backend=backend, workers=4, gpus_per_worker=1, evaluator=True,
        trainer_image="reg/resnet-imagenet-trainer:1.0", namespace="team",
        run_id="run-123", timeout_seconds=3600,
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"},
        gpu_tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml",
                          "effect": "NoSchedule"}],
        service_account="resnet-imagenet", gcs_secret="resnet-imagenet-gcp-key", train=train,
        start_timeout_seconds=7200.0)  # a ParallelFor-collected int comes back as a float
    args = parse(argv)
    assert (args.backend, args.workers, args.gpus_per_worker, args.evaluator, args.image,
            args.namespace, args.run_id, args.timeout, args.service_account,
            args.gcs_secret, args.start_timeout) == (
        backend, 4, 1, True, "reg/resnet-imagenet-trainer:1.0", "team", "run-123", 3600.0,
        "resnet-imagenet", "resnet-imagenet-gcp-key", 7200.0)
    assert args.node_selector == ["cloud.google.com/gke-accelerator=nvidia-tesla-v100"]
    assert args.toleration == ["dedicated=ml:NoSchedule"]
    assert args.train_args == train
    # The job the launcher would create from these flags: GPUs on the workers.
    from resnet_imagenet.launch import cli as launch_cli, tfjob, trainjob

    if backend == "tfjob":
        job = tfjob.build_tfjob(launch_cli.cluster_options(args))
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        replicas, pod = worker["replicas"], worker["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
    else:
        job = trainjob.build_trainjob(launch_cli.cluster_options(args))
        replicas, limits = (job["spec"]["trainer"]["numNodes"],
                            job["spec"]["trainer"]["resourcesPerNode"]["limits"])
        (patch,) = job["spec"]["runtimePatches"]
        pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "resnet-imagenet"
    assert replicas == 4 and int(limits["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}
    assert {"key": "dedicated", "operator": "Equal", "value": "ml",
            "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "gcs-key",
            "secret": {"secretName": "resnet-imagenet-gcp-key"}} in pod["volumes"]


def test_trainjob_backend_gets_the_same_kubernetes_flags():
    """The TrainJob backend takes the TFJob's flags (the launcher's `--backend trainjob`)."""
    argv = pipeline_params.launch_argv(
        backend="trainjob", workers=2, gpus_per_worker=1, evaluator=False, trainer_image="img:1",
        namespace="ns", run_id="r", timeout_seconds=60, gpu_node_selector={"a": "b"},
        gpu_tolerations=[{"key": "x", "operator": "Exists"}], service_account="sa",
        gcs_secret="key", train=["--data-dir", "d"], start_timeout_seconds=0)
    assert argv == ["launch", "--backend", "trainjob", "--workers", "2", "--gpus-per-worker",
                    "1", "--image", "img:1", "--namespace", "ns", "--node-selector", "a=b",
                    "--toleration", "x", "--service-account", "sa", "--gcs-secret", "key",
                    "--start-timeout", "0", "--run-id", "r", "--timeout", "60", "--",
                    "--data-dir", "d"]
    assert parse(argv).start_timeout == 0  # no limit: a job that waits for its GPUs


def test_train_argv_is_accepted_by_train():
    args = parse(["train", *pipeline_params.train_argv(
        data_uri="d", model_uri="m", resnet_size=18, num_classes=10, image_size=32,
        batch_size=64, train_steps=10.0, checkpoint_every=5, extra=["--log-every", "2"])])
    assert (args.data_dir, args.model_dir, args.resnet_size, args.num_classes, args.image_size,
            args.batch_size, args.train_steps, args.checkpoint_every, args.log_every) == (
        "d", "m", 18, 10, 32, 64, 10, 5, 2)


def test_local_backend_leaves_out_the_kubernetes_flags():
    argv = pipeline_params.launch_argv(
        backend="local", workers=2, gpus_per_worker=0, evaluator=False, trainer_image="img:1",
        namespace="ns", run_id="", timeout_seconds=0, gpu_node_selector={"a": "b"},
        gpu_tolerations=[{"key": "x"}], service_account="sa", gcs_secret="key",
        train=["--data-dir", "d"], start_timeout_seconds=60)
    assert argv == ["launch", "--backend", "local", "--workers", "2", "--gpus-per-worker", "0",
                    "--", "--data-dir", "d"]
    assert parse(argv).train_args == ["--data-dir", "d"]


@pytest.mark.parametrize("extra, expected", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--warmup-epochs", "x"], "argument --warmup-epochs: invalid float value: 'x'"),
    (["--lr-schedule", "cosine", "--lr-boundaries", "2", "4"],
     "--lr-boundaries 2 4 has no effect with --lr-schedule cosine"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
])
def test_train_extra_args_are_checked_with_the_trainers_flags(extra, expected):
    message = refusal(train_extra_args=extra)
    assert message.startswith(f"pipeline parameter train_extra_args={extra!r}: {expected}")
    assert message.endswith("(see 'resnet-imagenet train --help')")


def test_run_local_refuses_a_bad_train_arg_before_anything_runs(tmp_path, capsys):
    from resnet_imagenet import cli

    assert cli.main(["run-local", "--workdir", str(tmp_path / "demo"),
                     "--train-arg=--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pipeline parameter train_extra_args=")
    assert "unrecognized arguments: --no-such-flag" in err[0]
    assert not (tmp_path / "demo").exists()  # no demo data made, nothing converted


def test_good_train_extra_args_pass():
    pipeline_params.validate(**REFERENCE, train_extra_args=[
        "--lr-schedule", "cosine", "--warmup-epochs", "5", "--mixed-precision", "bfloat16"])


def test_run_raises_when_the_subcommand_fails(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="'resnet-imagenet convert' exited with status 2"):
        pipeline_params.run(pipeline_params.finalize_argv(str(tmp_path / "nothing")))
    assert capsys.readouterr().err.startswith("error: ")


def test_bad_parameters_stop_the_pipeline_at_its_first_step(tmp_path, capsys):
    """The real pipeline, run by kfp.local: nothing after validate-parameters starts."""
    from kfp import local

    from pipelines.resnet50_imagenet import resnet50_imagenet

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with pytest.raises(RuntimeError, match="Inner task failed: .*validate-parameters"):
        resnet50_imagenet(data_raw_uri="gs://b/raw", data_tfrecord_uri="gs://b/t",
                          data_model_uri="gs://b/m", data_export_uri="gs://b/e",
                          train_workers=4, train_gpus_per_worker=1, train_batch_size=250)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert ("UserError: pipeline parameter train_batch_size=250 is not divisible by the 4 GPUs "
            "(train_workers=4 x train_gpus_per_worker=1)") in out
    assert re.findall(r"Executing task '([^']+)'", out) == ["validate-parameters"]


def test_a_wrong_raw_layout_stops_the_pipeline_at_its_first_step_without_retries(tmp_path, capsys):
    """A raw directory that is neither the archives nor the extracted layout: refused by the
    (never retried) validate step, not by the conversion, whose refusal kfp.local (like Argo)
    would retry four times with backoff."""
    from kfp import local

    from pipelines.resnet50_imagenet import resnet50_imagenet

    raw = tmp_path / "raw"
    (raw / "n01440764").mkdir(parents=True)  # class folders one level too high
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with pytest.raises(RuntimeError, match="Inner task failed: .*validate-parameters"):
        resnet50_imagenet(train_backend="local", data_raw_uri=str(raw),
                          data_tfrecord_uri=str(tmp_path / "t"),
                          data_model_uri=str(tmp_path / "m"), data_export_uri=str(tmp_path / "e"))
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert (f"UserError: pipeline parameter data_raw_uri={raw} holds neither the four ILSVRC2012 "
            "archives (ILSVRC2012_img_train.tar, ") in out
    assert "nor the extracted layout (train/, validation/, validation_labels.txt)" in out
    assert re.findall(r"Executing task '([^']+)'", out) == ["validate-parameters"]
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("layout, expected", [
    ({"train/n01/a.JPEG": b"x", "validation/v.JPEG": b"x"},
     "validation_labels.txt not found: it gives the wnid of each validation image"),
    ({"train/n01/a.JPEG": b"x", "validation_labels.txt": b"n01\n"},
     "validation not found: the raw layout needs validation/<images>"),
    ({"train/.keep": b"", "validation/v.JPEG": b"x", "validation_labels.txt": b"n01\n"},
     "train holds no class directories"),
    ({"train/n01/a.JPEG": b"x", "validation/v.JPEG": b"x", "validation_labels.txt": b"n01\n",
      "synsets.txt": b"n01\nn02\n"}, "synsets.txt lists n02 but"),
])
def test_the_first_step_refuses_an_extracted_layout_with_top_level_gaps(tmp_path, layout,
                                                                        expected):
    """What the conversion would refuse after its retries, found by the validate step's
    pre-flight in a few requests (not a listing of every class)."""
    from resnet_imagenet import preflight

    raw = tmp_path / "raw"
    for rel, data in layout.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(data)
    with pytest.raises(UserError) as info:
        preflight.check_pipeline(raw=("data_raw_uri", str(raw)),
                                 tfrecord=("data_tfrecord_uri", str(tmp_path / "t")), outputs={})
    message = str(info.value)
    assert message.startswith("pipeline parameter data_raw_uri: ") and expected in message
    assert "\n" not in message and not (tmp_path / "t").exists()


def test_a_negative_start_timeout_is_refused():
    assert refusal(train_start_timeout_seconds=-1) == (
        "pipeline parameter train_start_timeout_seconds=-1 must be at least 0")
    pipeline_params.validate(**REFERENCE, train_start_timeout_seconds=0)  # 0: for ever
