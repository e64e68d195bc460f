"""Compile the pipeline to the YAML that the KFP UI uploads (and kfp.Client submits).

    python compile_pipeline.py [--output resnet50_imagenet_pipeline.yaml]

The images written into the YAML come from images/versions.env; RESNET_IMAGENET_REGISTRY and
RESNET_IMAGENET_TAG in the environment override them for one compilation.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_OUTPUT = "resnet50_imagenet_pipeline.yaml"


def compile_pipeline(output: str = DEFAULT_OUTPUT) -> str:
    """Write the compiled pipeline (PipelineSpec + Kubernetes platform spec) to ``output``."""
    from kfp import compiler

    from pipelines.resnet50_imagenet import resnet50_imagenet

    compiler.Compiler().compile(pipeline_func=resnet50_imagenet, package_path=output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="FILE",
                        help=f"where to write the pipeline YAML (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
