"""The raw ILSVRC2012 layout: listing, labels, texts, box XML, and each way it can be wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from resnet_imagenet.data import imagenet
from resnet_imagenet.data.sample import bbox_xml
from resnet_imagenet.errors import UserError


def test_demo_layout_is_listed_with_labels_texts_and_boxes(demo_raw):
    raw = Path(demo_raw)
    dataset = imagenet.load(demo_raw)
    assert dataset.synsets == tuple((raw / "synsets.txt").read_text().split())
    assert dataset.text("n00000003") == "digit three"
    train_files = sorted(p.relative_to(raw).as_posix() for p in (raw / "train").glob("*/*"))
    assert sorted(f.rel for f in dataset.train) == train_files
    for f in dataset.train:
        assert f.synset == f.rel.split("/")[1]
        assert dataset.synsets[f.label - 1] == f.synset
        assert f.boxes_rel == f"bounding_boxes/{f.synset}/{Path(f.rel).stem}.xml"
        assert (raw / f.boxes_rel).is_file()
    labels = (raw / "validation_labels.txt").read_text().split()
    assert [f.rel for f in dataset.validation] == \
        [f"validation/{n}" for n in sorted(p.name for p in (raw / "validation").iterdir())]
    assert [f.synset for f in dataset.validation] == labels
    assert all(f.boxes_rel is None and dataset.synsets[f.label - 1] == f.synset
               for f in dataset.validation)


def make_layout(root: Path, classes=("n02", "n01"), per_class=2, synsets=None, metadata=None,
                validation=None) -> Path:
    """A raw layout of placeholder files (listing and labels do not look inside images)."""
    for wnid in classes:
        (root / "train" / wnid).mkdir(parents=True)
        for n in range(per_class):
            (root / "train" / wnid / f"{wnid}_{n}.JPEG").write_bytes(b"jpeg")
    validation = list(classes) if validation is None else validation
    (root / "validation").mkdir(parents=True)
    for n, _ in enumerate(validation, start=1):
        (root / "validation" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(b"jpeg")
    (root / "validation_labels.txt").write_text("".join(f"{w}\n" for w in validation))
    if synsets is not None:
        (root / "synsets.txt").write_text("".join(f"{w}\n" for w in synsets))
    if metadata is not None:
        (root / "metadata.txt").write_text(metadata)
    return root


def test_labels_follow_sorted_directories_without_synsets_txt(tmp_path):
    dataset = imagenet.load(str(make_layout(tmp_path)))
    assert dataset.synsets == ("n01", "n02")
    assert {(f.synset, f.label) for f in dataset.train} == {("n01", 1), ("n02", 2)}
    assert [(f.synset, f.label) for f in dataset.validation] == [("n02", 2), ("n01", 1)]


def test_labels_follow_synsets_txt_order(tmp_path):
    dataset = imagenet.load(str(make_layout(tmp_path, synsets=["n02", "n01"])))
    assert dataset.synsets == ("n02", "n01")
    assert {(f.synset, f.label) for f in dataset.train} == {("n02", 1), ("n01", 2)}


def test_hidden_files_are_ignored_and_other_files_listed(tmp_path):
    raw = make_layout(tmp_path)
    (raw / "train" / "n01" / ".DS_Store").write_bytes(b"x")
    (raw / "train" / "n01" / "notes.txt").write_bytes(b"x")
    rels = {f.rel for f in imagenet.load(str(raw)).train}
    assert "train/n01/notes.txt" in rels and "train/n01/.DS_Store" not in rels


def test_metadata_accepts_tabs_and_synset_words_spaces():
    texts = imagenet.parse_metadata("n01\ttench, Tinca tinca\n\nn02 goldfish, Carassius auratus\n")
    assert texts == {"n01": "tench, Tinca tinca", "n02": "goldfish, Carassius auratus"}
    with pytest.raises(UserError, match="metadata.txt line 2: expected 'wnid<TAB>text'"):
        imagenet.parse_metadata("n01\tx\nnospace\n")


def test_boxes_are_normalised_by_the_xml_size_clipped_and_degenerate_ones_dropped():
    xml = bbox_xml("n01_1", "n01", 200, 100, (50, 25, 150, 75))
    assert imagenet.parse_boxes(xml) == [(0.25, 0.25, 0.75, 0.75)]
    two = xml.replace("</annotation>", (
        "<object><bndbox><xmin>-20</xmin><ymin>50</ymin><xmax>260</xmax><ymax>130</ymax></bndbox>"
        "</object><object><bndbox><xmin>90</xmin><ymin>10</ymin><xmax>90</xmax><ymax>20</ymax>"
        "</bndbox></object><object><bndbox><xmin>300</xmin><ymin>10</ymin><xmax>400</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>"))
    # second box clipped to the image; zero-width and fully-outside boxes dropped
    assert imagenet.parse_boxes(two) == [(0.25, 0.25, 0.75, 0.75), (0.0, 0.5, 1.0, 1.0)]


@pytest.mark.parametrize("xml", ["<annotation><size><width>0</width><height>5</height></size>"
                                 "</annotation>", "not xml", "<annotation/>"])
def test_bad_box_files_raise_value_error_naming_the_file(xml):
    with pytest.raises(ValueError, match="n01_1.xml"):
        imagenet.parse_boxes(xml, "bounding_boxes/n01/n01_1.xml")


def _break(raw: Path, how: str) -> None:
    if how == "no-train":
        shutil.rmtree(raw / "train")
    elif how == "no-validation":
        shutil.rmtree(raw / "validation")
    elif how == "no-labels":
        (raw / "validation_labels.txt").unlink()
    elif how == "label-count":
        (raw / "validation_labels.txt").write_text("n01\n")
    elif how == "unknown-wnid":
        (raw / "validation_labels.txt").write_text("n01\nn09\n")
    elif how == "empty-class":
        shutil.rmtree(raw / "train" / "n02")
        (raw / "train" / "n02").mkdir()
    elif how == "class-is-file":
        (raw / "train" / "README").write_text("hello")
    elif how == "synset-without-dir":
        (raw / "synsets.txt").write_text("n01\nn02\nn03\n")
    elif how == "dir-not-in-synsets":
        (raw / "synsets.txt").write_text("n01\n")
    elif how == "duplicate-synset":
        (raw / "synsets.txt").write_text("n01\nn02\nn01\n")
    elif how == "empty-validation":
        shutil.rmtree(raw / "validation")
        (raw / "validation").mkdir()


LAYOUT_ERRORS = {
    "no-train": r"raw/train not found: the raw layout needs train/<wnid>/<images>",
    "no-validation": r"raw/validation not found",
    "no-labels": r"raw/validation_labels.txt not found",
    "label-count": r"validation_labels.txt has 1 labels but .*raw/validation holds 2 files",
    "unknown-wnid": r"validation_labels.txt line 2: n09 \(for ILSVRC2012_val_00000002.JPEG\) "
                    r"is not one of the 2 classes",
    "empty-class": r"raw/train/n02 is empty: every class needs training images",
    "class-is-file": r"raw/train/README is not a directory",
    "synset-without-dir": r"synsets.txt lists n03 but .*raw/train/n03 does not exist",
    "dir-not-in-synsets": r"raw/train/n02 is not listed in .*synsets.txt",
    "duplicate-synset": r"synsets.txt lists n01 twice",
    "empty-validation": r"raw/validation holds no images",
}


@pytest.mark.parametrize("how", sorted(LAYOUT_ERRORS))
def test_layout_errors_are_one_line_and_name_the_input(tmp_path, how):
    raw = make_layout(tmp_path / "raw", classes=("n01", "n02"))
    _break(raw, how)
    with pytest.raises(UserError, match=LAYOUT_ERRORS[how]) as info:
        imagenet.load(str(raw))
    assert "\n" not in str(info.value)


def test_missing_raw_dir_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        imagenet.load(str(tmp_path / "nowhere"))
