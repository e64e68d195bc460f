"""Run `resnet-imagenet train` as a Kubeflow TFJob or TrainJob, or as N local worker processes.

Everything after '--' goes to `resnet-imagenet train` unchanged; it must name --data-dir and
--model-dir. Examples:

  # 4 workers x 1 GPU on a GKE node pool, validation curves from an evaluator replica
  resnet-imagenet launch --workers 4 --gpus-per-worker 1 --accelerator nvidia-tesla-v100 \\
      --evaluator --image REGISTRY/resnet-imagenet-trainer:TAG --service-account trainer \\
      --run-id "$RUN_ID" --timeout 259200 -- \\
      --data-dir gs://BUCKET/imagenet/tfrecords --model-dir gs://BUCKET/runs/r50

  # the manifest only, for kubectl apply -f -
  resnet-imagenet launch --dry-run --workers 2 -- --data-dir gs://B/d --model-dir gs://B/m

  # the same on Kubeflow Trainer v2: a TrainJob on the resnet-imagenet-tensorflow runtime
  resnet-imagenet launch --backend trainjob --workers 4 --gpus-per-worker 1 -- \\
      --data-dir gs://BUCKET/imagenet/tfrecords --model-dir gs://BUCKET/runs/r50

  # the same contract on this machine: 2 processes with TF_CONFIG on 127.0.0.1
  resnet-imagenet launch --backend local --workers 2 -- --data-dir D --model-dir M

The tfjob and trainjob backends wait for the job to finish and stream worker 0's log. Exit
status: 0 when training succeeded; 1 when it failed (the failed replica's last log lines are
printed) or when no replica ran within --start-timeout (the reasons are printed while it
waits), or when the API server stayed unreachable for --api-outage-timeout (then the job is
not deleted: the last line says how to check it); 124 after --timeout and 143 on SIGTERM, all
after the job is deleted (the local backend stops its processes instead); 2 on bad input, before
anything is created. With the same --run-id
(by default $KFP_RUN_ID) a restarted launcher re-attaches to its job instead of starting another.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import lifecycle, local, options, tfjob, trainjob
from resnet_imagenet.launch.backend import ClusterBackend

BACKENDS = ("tfjob", "trainjob", "local")
CLUSTER_BACKENDS: dict[str, ClusterBackend] = {b.name: b for b in (tfjob.BACKEND,
                                                                   trainjob.BACKEND)}
# The tfjob group's flags: under Trainer v2 the TrainingRuntime decides these for every TrainJob.
RUNTIME_OWNED = ("restart_policy", "clean_pod_policy", "backoff_limit",
                 "ttl_seconds_after_finished")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="tfjob",
                        help="a TFJob (training-operator v1, default) or a TrainJob (Kubeflow "
                        "Trainer v2) on the current Kubernetes cluster, or local processes")
    parser.add_argument("--workers", type=int, default=1, help="worker replicas (default 1); "
                        "worker 0 is the chief")
    parser.add_argument("--gpus-per-worker", type=int, default=0,
                        help="nvidia.com/gpu per worker (default 0); local: GPUs each process sees")
    parser.add_argument("--evaluator", action="store_true",
                        help="also run 'evaluate --watch' on the checkpoints as they appear")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop (and delete the job) after this long (default: no limit); "
                        "the launcher enforces it: it is also written to the TFJob's "
                        "runPolicy.activeDeadlineSeconds (which operator v1.9 does not enforce "
                        "promptly) or the TrainJob's spec.activeDeadlineSeconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the TFJob (or TrainJob) YAML for 'kubectl apply -f -' "
                        "(local: the processes and their TF_CONFIG) and exit")
    _add_cluster_arguments(parser.add_argument_group("tfjob and trainjob backends"))
    _add_tfjob_arguments(parser.add_argument_group("tfjob backend"))
    parser.add_argument_group(
        "trainjob backend",
        f"the TrainJob references the TrainingRuntime {trainjob.RUNTIME} (with --evaluator "
        f"{trainjob.RUNTIME_WITH_EVALUATOR}, which needs --gpus-per-worker 1 or more) of "
        "manifests/components/trainer-v2; the runtime decides the restart and clean-up "
        "policies, retries and TTL, so the tfjob backend's flags for them are refused")
    parser.add_argument("train_args", nargs="*", metavar="-- TRAIN_FLAGS",
                        help="flags of 'resnet-imagenet train'")


def _add_cluster_arguments(job) -> None:
    job.add_argument("--image", default=options.DEFAULT_IMAGE,
                     help="trainer image, pinned by tag or digest (default %(default)s)")
    job.add_argument("--namespace", help="default: the kubeconfig context's, or the pod's")
    job.add_argument("--name", help="job name (default: derived from --run-id, else random)")
    job.add_argument("--run-id", default=os.environ.get("KFP_RUN_ID", ""),
                     help="KFP run (and task) id: the same id gives the same job, which a "
                     "restarted launcher re-attaches to (default $KFP_RUN_ID)")
    job.add_argument("--kubeconfig", help="default: in a pod its service account, else "
                     "$KUBECONFIG or ~/.kube/config")
    job.add_argument("--context", help="kubeconfig context (default: the current one)")
    job.add_argument("--service-account", default="",
                     help="pods' service account, e.g. one bound to a GCP service account with "
                     "Workload Identity")
    job.add_argument("--gcs-secret", default="",
                     help=f"secret with a GCP key as {options.GCS_KEY_FILE}, mounted at "
                     f"{options.GCS_KEY_DIR} (GOOGLE_APPLICATION_CREDENTIALS)")
    job.add_argument("--pvc", default="", metavar="CLAIM:PATH",
                     help="mount a shared PersistentVolumeClaim in every pod")
    job.add_argument("--accelerator", default="", metavar="TYPE",
                     help=f"GKE GPU node pool: nodeSelector {options.GKE_ACCELERATOR_LABEL}=TYPE")
    job.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                     help="node label the pods require (repeatable)")
    job.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                     help="taint the pods tolerate (repeatable; KEY[=VALUE]:NoExecute:SECONDS "
                     "sets tolerationSeconds); with GPUs, nvidia.com/gpu is tolerated already")
    job.add_argument("--cpu", default="4", help="CPU request per pod (default %(default)s)")
    job.add_argument("--memory", default="16Gi",
                     help="memory request and limit per pod (default %(default)s)")
    job.add_argument("--shm-size", default="2Gi", help="/dev/shm size (default %(default)s)")
    job.add_argument("--termination-grace-period", type=int,
                     default=options.DEFAULT_TERMINATION_GRACE_S, metavar="SECONDS",
                     help="from SIGTERM to SIGKILL for every replica: a preempted worker "
                     "saves a checkpoint in it (default %(default)s)")
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="extra environment variable for the pods (repeatable)")
    job.add_argument("--start-timeout", type=float, default=lifecycle.DEFAULT_START_TIMEOUT,
                     metavar="SECONDS",
                     help="delete the job and fail when no replica has run for this long "
                     "(pods unschedulable or never created, images not pulled, crash loops; "
                     "the reasons are printed as they change); 0: wait for ever (default "
                     "%(default)g)")
    job.add_argument("--max-restarts", type=int, default=lifecycle.DEFAULT_MAX_RESTARTS,
                     metavar="N",
                     help="tfjob: delete the job and fail once its replicas were restarted more "
                     "than N times (training-operator recreates a failed pod without limit "
                     "under --restart-policy ExitCode; a TrainJob's runtime bounds its own "
                     "restarts) (default %(default)s)")
    job.add_argument("--api-outage-timeout", type=float,
                     default=lifecycle.DEFAULT_API_OUTAGE_TIMEOUT, metavar="SECONDS",
                     help="how long the API server may be unreachable (or answer 429/5xx) "
                     "while the launcher creates or follows the job; it retries meanwhile, "
                     "saying so once a minute, then fails without deleting the job it cannot "
                     "see; 0: for ever (default %(default)g)")
    job.add_argument("--poll-interval", type=float, default=lifecycle.DEFAULT_POLL_INTERVAL,
                     metavar="SECONDS", help="how often to check the job (default %(default)s)")
    job.add_argument("--log-tail", type=int, default=lifecycle.DEFAULT_LOG_TAIL,
                     metavar="LINES",
                     help="log lines shown of each failed replica (default %(default)s)")


def _add_tfjob_arguments(job) -> None:
    job.add_argument("--restart-policy", choices=tfjob.RESTART_POLICIES,
                     default=tfjob.TFJobOptions.restart_policy,
                     help="ExitCode (default): restart on signals/preemption (exit 128+), fail "
                     "on errors (exit 1-127)")
    job.add_argument("--clean-pod-policy", choices=tfjob.CLEAN_POD_POLICIES,
                     default=tfjob.TFJobOptions.clean_pod_policy,
                     help="pods deleted when the job ends (default Running: finished pods stay "
                     "for their logs)")
    job.add_argument("--backoff-limit", type=int, default=tfjob.TFJobOptions.backoff_limit,
                     help="restarts before the job fails (default %(default)s)")
    job.add_argument("--ttl-seconds-after-finished", type=int,
                     default=tfjob.TFJobOptions.ttl_seconds_after_finished,
                     help="delete the finished TFJob after this long (default one day)")


def _common_options(args: argparse.Namespace) -> dict:
    """The :class:`~resnet_imagenet.launch.options.ClusterOptions` fields the flags give."""
    return dict(
        name=args.name or options.job_name(args.run_id),
        train_args=list(args.train_args),
        namespace=args.namespace,
        image=args.image,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        evaluator=args.evaluator,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        termination_grace_period=args.termination_grace_period,
        accelerator=args.accelerator,
        node_selector=options.parse_key_values(args.node_selector, "--node-selector"),
        tolerations=[options.parse_toleration(t) for t in args.toleration],
        service_account=args.service_account,
        gcs_secret=args.gcs_secret,
        pvc=args.pvc,
        env=options.parse_key_values(args.env, "--env"),
        active_deadline_seconds=math.ceil(args.timeout) if args.timeout else None,
        run_id=args.run_id,
    )


def cluster_options(args: argparse.Namespace) -> options.ClusterOptions:
    """The options of ``args.backend`` (tfjob or trainjob) the flags describe (validated when
    the manifest is built); UserError for a tfjob flag that a TrainJob's runtime decides."""
    if args.backend == "trainjob":
        for attribute in RUNTIME_OWNED:
            value = getattr(args, attribute)
            if value != getattr(tfjob.TFJobOptions, attribute):
                flag = "--" + attribute.replace("_", "-")
                raise UserError(
                    f"{flag} {value}: with --backend trainjob the TrainingRuntime decides this "
                    f"for every TrainJob; leave the flag out, or edit the runtime in "
                    "manifests/components/trainer-v2"
                )
        return trainjob.TrainJobOptions(**_common_options(args))
    run_policy = {attribute: getattr(args, attribute) for attribute in RUNTIME_OWNED}
    return tfjob.TFJobOptions(**_common_options(args), **run_policy)


def check_train_args(train_args: list[str]) -> None:
    """The train flags after ``--``, parsed as ``train`` will: a bad one is one line and exit 2
    here, not an exit 1 and a usage message from every worker (or a failed job)."""
    from resnet_imagenet.training import cli as train_cli

    try:
        train_cli.config_from_argv(train_args)
    except UserError as exc:
        raise UserError(f"the train flags after '--': {exc}") from None


def run(args: argparse.Namespace) -> int:
    check_train_args(args.train_args)
    if args.backend == "local":
        return local.launch_local(
            args.train_args, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            evaluator=args.evaluator, timeout=args.timeout, dry_run=args.dry_run)
    if args.start_timeout < 0:
        raise UserError(f"--start-timeout {args.start_timeout:g}: must be 0 (wait for ever) or "
                        "more")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be 0 (no restart) or more")
    if args.backend == "trainjob" and args.max_restarts != lifecycle.DEFAULT_MAX_RESTARTS:
        raise UserError(f"--max-restarts {args.max_restarts}: with --backend trainjob the "
                        "TrainingRuntime's failurePolicy.maxRestarts decides; leave the flag "
                        "out, or edit the runtime in manifests/components/trainer-v2")
    if args.api_outage_timeout < 0:
        raise UserError(f"--api-outage-timeout {args.api_outage_timeout:g}: must be 0 (retry for "
                        "ever) or more seconds")
    backend = CLUSTER_BACKENDS[args.backend]
    opts = cluster_options(args)
    if args.dry_run:
        sys.stdout.write(backend.manifest_yaml(opts))
        return 0
    return lifecycle.launch(
        backend, opts, kubeconfig=args.kubeconfig, context=args.context, timeout=args.timeout,
        poll_interval=args.poll_interval, log_tail=args.log_tail,
        start_timeout=args.start_timeout, api_outage_timeout=args.api_outage_timeout,
        max_restarts=args.max_restarts if args.backend == "tfjob" else None)
