"""Running ``convert`` in tests and comparing its outputs."""

from __future__ import annotations

from pathlib import Path

from resnet_imagenet.data import convert

SHARDS = {"train_shards": 4, "validation_shards": 2}  # the demo dataset in few shards


def run_convert(raw, out, **kw) -> dict:
    """``convert.convert`` of RAW into OUT in one process, with :data:`SHARDS` unless given."""
    return convert.convert(str(raw), str(out), **{**SHARDS, "workers": 1, **kw})


def tree(root) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}
