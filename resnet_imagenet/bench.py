"""Benchmarks: each prints its figures and the ratio against a baseline run in the same process.

    resnet-imagenet bench convert --raw-dir RAW        converter vs the reference algorithm
    resnet-imagenet bench input --data-dir TFRECORDS   input pipeline vs the reference pipeline
    resnet-imagenet bench predict --model SAVED        serving latency (batch 1) and throughput

Speed goals are judged by these figures, never by timed tests: the same process runs the
baseline and the candidate on the same input, back to back, so a noisy shared machine shifts
both. Each benchmark prints a final JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json

from resnet_imagenet.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    conv = sub.add_parser("convert", help="converter images/s vs the reference algorithm")
    conv.add_argument("--raw-dir", default=None, metavar="RAW",
                      help="raw ImageNet layout to read (default: generate ImageNet-sized JPEGs)")
    conv.add_argument("--workers", type=int, default=1,
                      help="worker processes for both, one thread each (default 1)")
    conv.add_argument("--limit", type=int, default=400, help="images to convert; also how many ImageNet-sized JPEGs to generate "
                      "when no --raw-dir is given (default 400)")

    inp = sub.add_parser("input", help="input pipeline images/s vs the reference pipeline")
    inp.add_argument("--data-dir", required=True, metavar="TFRECORDS",
                     help="TFRecord shards (local or gs://) made by 'convert'")
    inp.add_argument("--image-size", type=int, default=224)
    inp.add_argument("--batch-size", type=int, default=64)
    inp.add_argument("--batches", type=int, default=20, help="batches timed per pipeline")

    pred = sub.add_parser("predict", help="SavedModel latency at batch 1 and throughput at 32")
    pred.add_argument("--model", required=True, metavar="SAVED",
                      help="export directory (SAVED or SAVED/<version>)")
    pred.add_argument("--images", nargs="*", default=None, metavar="IMAGE",
                      help="images to send (default: generated 500x375 JPEGs)")
    pred.add_argument("--runs", type=int, default=50, help="timed batch-1 requests")


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "convert":
        from resnet_imagenet.data.convert_bench import bench

        if args.workers < 1 or args.limit < 1:
            raise UserError("--workers and --limit must be at least 1")
        result = bench(args.raw_dir, workers=args.workers, limit=args.limit)
    elif args.benchmark == "input":
        from resnet_imagenet.data.pipeline import bench_input

        result = bench_input(args.data_dir, image_size=args.image_size,
                             batch_size=args.batch_size, batches=args.batches)
    else:
        from resnet_imagenet import preflight
        from resnet_imagenet.predict import bench_predict

        preflight.check_command(reads={"--model": args.model})
        result = bench_predict(args.model, images=args.images, runs=args.runs)
    print(json.dumps(result, sort_keys=True))
    return 0
