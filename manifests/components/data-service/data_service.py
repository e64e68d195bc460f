"""tf.data service servers for the input offload: ``python data_service.py dispatcher|worker``.

A trainer started with ``--data-service grpc://resnet-imagenet-data-dispatcher:5050`` registers
its input pipeline with the dispatcher; the workers then read, decode and augment the shards
on CPU nodes and stream ready batches to the GPU workers. This file is mounted from a
ConfigMap into the launcher image, whose TensorFlow is pinned to the trainer image's version
(workers execute the dataset graphs that the trainers serialise).
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("data_service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["dispatcher", "worker"])
    parser.add_argument("--port", type=int, required=True, help="port to serve gRPC on")
    parser.add_argument(
        "--work-dir",
        default="",
        help="dispatcher: journal directory; with one, a restarted dispatcher recovers its state "
        "(jobs, registered workers) instead of failing the trainers' input pipelines",
    )
    parser.add_argument(
        "--dispatcher-address", default="", help="worker: HOST:PORT of the dispatcher"
    )
    parser.add_argument(
        "--worker-address",
        default="",
        help="worker: HOST:PORT at which trainers reach this worker (the pod IP: the dispatcher "
        "hands this address to every trainer)",
    )
    return parser


def serve(args: argparse.Namespace):
    """Start the server that ``args`` describe and return it (already serving)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf  # after the flags are checked: a bad flag fails in milliseconds

    service = tf.data.experimental.service
    if args.role == "dispatcher":
        config = service.DispatcherConfig(
            port=args.port,
            work_dir=args.work_dir or None,
            fault_tolerant_mode=bool(args.work_dir),
        )
        return service.DispatchServer(config)
    config = service.WorkerConfig(
        dispatcher_address=args.dispatcher_address,
        worker_address=args.worker_address,
        port=args.port,
    )
    return service.WorkerServer(config)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.role == "worker" and not (args.dispatcher_address and args.worker_address):
        parser.error("a worker needs --dispatcher-address and --worker-address")
    server = serve(args)
    log.info("tf.data service %s serving on port %d", args.role, args.port)
    server.join()


if __name__ == "__main__":
    main()
