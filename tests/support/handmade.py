"""A raw ImageNet layout made of hand-built JPEG headers: its bytes depend on nothing installed.

The converter reads images from their headers only, so byte strings with a valid JPEG frame
(SOI, SOF0, SOS, entropy-coded bytes, EOI) are all it needs. Unlike images made with Pillow,
these bytes are the same whatever Pillow or libjpeg version is installed, so a digest of the
converter's output over them can be fixed in a test (see tests/unit/test_convert_tf_free.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def jpeg(width: int, height: int, components: int = 3, seed: str = "", size: int = 600) -> bytes:
    """A JPEG frame and ``size`` bytes of pseudo-random scan data (no 0xFF in it)."""
    sof = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
    sof += b"".join(bytes([c + 1, 0x11, 0]) for c in range(components))
    sos = bytes([components]) + b"".join(bytes([c + 1, 0]) for c in range(components))
    sos += bytes([0, 63, 0])
    data = bytearray()
    block = seed.encode()
    while len(data) < size:
        block = hashlib.sha256(block).digest()
        data += block
    scan = bytes(data[:size]).replace(b"\xff", b"\x00")
    return (b"\xff\xd8"
            + b"\xff\xc0" + (len(sof) + 2).to_bytes(2, "big") + sof
            + b"\xff\xda" + (len(sos) + 2).to_bytes(2, "big") + sos
            + scan + b"\xff\xd9")


def box_xml(name: str, wnid: str, width: int, height: int, box: tuple[int, int, int, int]) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<annotation><folder>{wnid}</folder><filename>{name}</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<object><name>{wnid}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>\n")


CLASSES = ("n01000001", "n01000002", "n01000003")


def write_raw(root: Path) -> Path:
    """3 classes x 6 images (boxes for most, one grey, one cut short, one not an image) and
    5 validation images; returns ``root``."""
    for c, wnid in enumerate(CLASSES):
        for n in range(1, 7):
            name = f"{wnid}_{n}"
            width, height = 40 + 7 * n + c, 30 + 5 * n
            data = jpeg(width, height, 1 if n == 4 else 3, seed=name, size=300 + 50 * n)
            if n == 5 and c == 1:
                data = data[:-40]  # no end-of-image marker: skipped and listed
            path = root / "train" / wnid / f"{name}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if n != 3:
                xml = root / "bounding_boxes" / wnid / f"{name}.xml"
                xml.parent.mkdir(parents=True, exist_ok=True)
                xml.write_text(box_xml(name, wnid, width, height, (n, 2, width - n, height - 3)))
        if c == 2:
            (root / "train" / wnid / "notes.txt").write_text("not an image\n")
    labels = []
    for n in range(1, 6):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        (root / "validation").mkdir(parents=True, exist_ok=True)
        (root / "validation" / name).write_bytes(jpeg(50 + n, 45, seed=name))
        labels.append(CLASSES[n % 3])
    (root / "validation_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "metadata.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate(CLASSES)))
    return root


def tree_digest(root: Path, skip: str | None = None) -> str:
    """SHA-256 over every file under ``root``: relative path and bytes, in sorted order
    (leaving out the directory ``skip``, relative to ``root``)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        if skip and path.relative_to(root).as_posix().startswith(skip + "/"):
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def files_of(raw: Path) -> dict[str, bytes]:
    """Every file of a raw layout by its path under ``raw``."""
    return {p.relative_to(raw).as_posix(): p.read_bytes()
            for p in sorted(Path(raw).rglob("*")) if p.is_file()}


def write_archives(raw: Path, dest: Path, seed: int = 0) -> Path:
    """The four official archives holding the extracted layout ``raw`` (sample-data's packer)."""
    from resnet_imagenet.data.sample import to_archives

    dest.mkdir(parents=True, exist_ok=True)
    for name, data in to_archives(files_of(raw), seed).items():
        (dest / name).write_bytes(data)
    return dest
