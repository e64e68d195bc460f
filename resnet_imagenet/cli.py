"""``resnet-imagenet <command>``: one entry point for every step of the pipeline.

Each subcommand lives in the module that does the work. That module defines

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        # the exit status

and the KFP component of the step calls the same function the subcommand calls. Modules are
imported only when their command is used, so ``--help`` and the launcher stay fast and never
import TensorFlow needlessly.

Commands that live outside the library (``run-local``, the KFP side in ``pipelines/``) are
registered in the entry-point group ``resnet_imagenet.commands`` (``name = "module"`` in
pyproject.toml); their module also sets ``SUMMARY``, the line of ``--help``. A module that cannot
be imported (an image without kfp or without ``pipelines/``) makes its command a one-line error.

Bad input raises :class:`~resnet_imagenet.errors.UserError`; this module prints it as one line,
``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import logging
import os
import sys

from resnet_imagenet import __version__
from resnet_imagenet.errors import UserError

# name -> (module, one-line summary). The order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": (
        "resnet_imagenet.data.sample",
        "build the small real demo dataset (handwritten digits) in the raw ImageNet layout",
    ),
    "convert": (
        "resnet_imagenet.data.convert",
        "convert raw ILSVRC2012 JPEGs, labels and boxes into sharded Inception TFRecords",
    ),
    "train": (
        "resnet_imagenet.training.cli",
        "train ResNet with the custom multi-worker loop (TF_CONFIG decides the strategy)",
    ),
    "evaluate": (
        "resnet_imagenet.evaluation",
        "top-1/top-5 of a checkpoint over the validation shards (or --watch during training)",
    ),
    "export": (
        "resnet_imagenet.export",
        "write a SavedModel that serves JPEG/PNG bytes on CPU and GPU (TF Serving layout)",
    ),
    "predict": (
        "resnet_imagenet.predict",
        "classify image files with an exported SavedModel",
    ),
    "launch": (
        "resnet_imagenet.launch.cli",
        "run training as a Kubeflow TFJob, or as N local worker processes with TF_CONFIG",
    ),
    "bench": (
        "resnet_imagenet.bench",
        "benchmarks: images/s or latency against a baseline in the same process",
    ),
}

# The entry-point group of the commands other packages of this distribution add (run-local).
ENTRY_POINT_GROUP = "resnet_imagenet.commands"


@functools.lru_cache(maxsize=1)
def plugin_commands() -> dict[str, str]:
    """name -> module of the commands registered in :data:`ENTRY_POINT_GROUP` (not imported)."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in sorted(found, key=lambda ep: ep.name)
            if ep.name not in COMMANDS}


def command_names() -> list[str]:
    """Every command: the library's in pipeline order, then the registered ones."""
    return [*COMMANDS, *plugin_commands()]


def _import_plugin(name: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"the {name} command cannot be loaded here ({exc}; its module {module_name} is "
            f"registered in the {ENTRY_POINT_GROUP} entry points): install a checkout of this "
            "repository with 'pip install -e .', or use an image built with pipelines/ and "
            "components/"
        ) from None


def _summary(name: str) -> str:
    if name in COMMANDS:
        return COMMANDS[name][1]
    try:
        module = _import_plugin(name, plugin_commands()[name])
    except UserError:
        return "(not available in this installation: 'resnet-imagenet " + name + "' says why)"
    return getattr(module, "SUMMARY", "") or (module.__doc__ or "").strip().split("\n")[0]


class _TopParser(argparse.ArgumentParser):
    """The list of commands is made when help is shown: only then are plug-in modules imported
    (for their SUMMARY)."""

    def format_help(self) -> str:
        lines = [f"  {name:<12} {_summary(name)}" for name in command_names()]
        self.epilog = ("commands:\n" + "\n".join(lines)
                       + "\n\n'resnet-imagenet COMMAND --help' describes each command's flags.")
        return super().format_help()


def _top_parser() -> argparse.ArgumentParser:
    parser = _TopParser(
        prog="resnet-imagenet",
        description="Train ResNet-50 on ImageNet: convert, train, evaluate, export, on one "
        "machine or on Kubernetes (Kubeflow Pipelines + TFJob).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (also TensorFlow's own)"
    )
    parser.add_argument("command", choices=command_names(), metavar="COMMAND", help="see below")
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one subcommand and the module that runs it.

    Raises UserError when a registered command's module cannot be imported."""
    if name in COMMANDS:
        module_name, summary = COMMANDS[name]
        module = importlib.import_module(module_name)
    else:
        module = _import_plugin(name, plugin_commands()[name])
        summary = getattr(module, "SUMMARY", name)
    parser = argparse.ArgumentParser(
        prog=f"resnet-imagenet {name}",
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def _setup_logging(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split "[global flags] COMMAND [command flags]" by hand so each command owns its flags.
    index = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    top_args = top.parse_args(argv[: index + 1])
    _setup_logging(top_args.verbose)
    try:
        parser, module = command_parser(top_args.command)
        args = parser.parse_args(argv[index + 1:])
        status = module.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
