"""Filled by its issue; until then the command exits 2."""

import argparse

from resnet_imagenet.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise UserError("not implemented yet")
