"""Compile the pipeline to the YAML that the KFP UI uploads (and kfp.Client submits).

    python compile_pipeline.py [--output resnet50_imagenet_pipeline.yaml] [--kfp-backend 2.17]
        [--convert-parallelism 8] [--bucket-key-secret NAME] [--convert-deadline 12h] ...

The images written into the YAML come from images/versions.env; RESNET_IMAGENET_REGISTRY and
RESNET_IMAGENET_TAG in the environment override them for one compilation. The flags set what
KFP takes only as constants (see pipelines/resnet50_imagenet.py, Options).
"""

from __future__ import annotations

import argparse
import re
import sys

DEFAULT_OUTPUT = "resnet50_imagenet_pipeline.yaml"
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h``, ``14d`` -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give seconds or a number with s, m, h or d (12h)")
    return int(match.group(1)) * _UNIT[match.group(2)]


def compile_pipeline(output: str = DEFAULT_OUTPUT, options=None) -> str:
    """Write the compiled pipeline (PipelineSpec + Kubernetes platform spec) to ``output``."""
    import os

    from kfp import compiler

    from pipelines.resnet50_imagenet import Options, build_pipeline

    pipeline = build_pipeline(options or Options())
    # A temporary name in the same folder, renamed when complete: never a half-written YAML.
    partial = os.path.join(os.path.dirname(os.path.abspath(output)),
                           f".{os.path.basename(output)}.{os.getpid()}.tmp.yaml")
    try:
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=partial)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return output


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`pipelines.resnet50_imagenet.Options` (shared with pipeline_check)."""
    from pipelines.resnet50_imagenet import KFP_BACKENDS, Options

    defaults = Options()
    parser.add_argument("--kfp-backend", choices=KFP_BACKENDS, default=defaults.kfp_backend,
                        help="the KFP backend the YAML is for: 2.17 (2.17.0 or newer: with the "
                        "run's deadline and TTL) or 2.14 (2.14.0 to 2.16.x: without them) "
                        f"(default {defaults.kfp_backend})")
    parser.add_argument("--convert-parallelism", type=int, default=defaults.convert_parallelism,
                        metavar="N", help="conversion pods running at once "
                        f"(default {defaults.convert_parallelism})")
    parser.add_argument("--bucket-key-secret", default="", metavar="NAME",
                        help="mount this Secret's key.json at /var/secrets/google in every step "
                        "and in the training pods (GOOGLE_APPLICATION_CREDENTIALS), for clusters "
                        "without Workload Identity, e.g. the generic overlay's "
                        "resnet-imagenet-gcp-key (default: none)")
    for name, what in (("small-deadline", "checks, listings, finalize, report"),
                       ("convert-deadline", "one conversion task"),
                       ("evaluate-deadline", "the evaluation"),
                       ("export-deadline", "the SavedModel export"),
                       ("train-timeout-max", "the largest train_timeout_seconds a run may ask"),
                       ("ttl-after-finished", "the finished run's Workflow and pods kept")):
        default = getattr(defaults, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=duration, default=default, metavar="DURATION",
                            help=f"{what} (default {default} s)")


def options_from(args: argparse.Namespace):
    from pipelines.resnet50_imagenet import Options

    return Options(
        kfp_backend=args.kfp_backend, convert_parallelism=args.convert_parallelism,
        bucket_key_secret=args.bucket_key_secret, small_deadline=args.small_deadline,
        convert_deadline=args.convert_deadline, evaluate_deadline=args.evaluate_deadline,
        export_deadline=args.export_deadline, train_timeout_max=args.train_timeout_max,
        ttl_after_finished=args.ttl_after_finished)


def main(argv: list[str] | None = None) -> int:
    from resnet_imagenet.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="FILE",
                        help=f"where to write the pipeline YAML (default {DEFAULT_OUTPUT})")
    add_option_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(f"wrote {compile_pipeline(args.output, options_from(args))}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
