"""``convert`` from the four official ILSVRC2012 archives: the bytes of the extracted layout,
tasks, resuming, and one-line refusals of bad archives."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from resnet_imagenet import cli
from resnet_imagenet.data import archives, sample
from resnet_imagenet.data.tfrecord import read_records
from tests.support.conversion import run_convert, tree
from tests.support.handmade import files_of

CACHE = "_shards/archives/"


def without_index(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if not k.startswith(CACHE)}


@pytest.fixture(scope="module")
def demo_archives(demo_raw, tmp_path_factory) -> Path:
    """The demo dataset of ``demo_raw`` (same seed and size) as the four archives."""
    out = tmp_path_factory.mktemp("archives") / "raw"
    sample.build(str(out), seed=0, per_class=20, as_archives=True)
    return out


@pytest.fixture(scope="module")
def extracted_out(demo_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extracted") / "out"
    run_convert(demo_raw, out)
    return out


@pytest.fixture(scope="module")
def archives_out(demo_archives, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("from-archives") / "out"
    run_convert(demo_archives, out, workers=2)
    return out


def test_sample_data_archives_hold_the_demo_files(demo_raw, demo_archives):
    assert sorted(p.name for p in demo_archives.iterdir()) == sorted(archives.OFFICIAL)
    with tarfile.open(demo_archives / archives.TRAIN) as outer:
        assert outer.getnames() == [f"n0000000{c}.tar" for c in range(10)]
        inner = tarfile.open(fileobj=outer.extractfile("n00000003.tar"))
        assert {n: inner.extractfile(n).read() for n in inner.getnames()} == \
            {p.name: p.read_bytes() for p in (Path(demo_raw) / "train/n00000003").iterdir()}
    with tarfile.open(demo_archives / archives.VALIDATION) as val:
        assert val.getnames() == sorted(p.name for p in (Path(demo_raw) / "validation").iterdir())
    devkit = archives.read_devkit(str(demo_archives))
    assert devkit.classes == {f"n0000000{c}": f"digit {w}" for c, w in
                              enumerate(sample.DIGIT_NAMES)}
    # the devkit numbers classes in an order of its own, as the real one does
    assert [devkit.wnid_of_id[i] for i in range(1, 11)] != sorted(devkit.classes)
    labels = (Path(demo_raw) / "validation_labels.txt").read_text().split()
    assert [devkit.wnid_of_id[i] for i in devkit.ground_truth] == labels


def test_archives_convert_to_the_bytes_of_the_extracted_layout(extracted_out, archives_out):
    assert without_index(tree(archives_out)) == tree(extracted_out)
    index = sorted(k[len(CACHE):] for k in tree(archives_out) if k.startswith(CACHE))
    # the boxes one object per class (boxes.json lists them); no claim or heartbeat is left
    assert index == sorted(["boxes.json", "devkit.json", "train.json", "validation.json"]
                           + [f"train-n0000000{c}.json" for c in range(10)]
                           + [f"boxes/n0000000{c}.json" for c in range(10)])
    record = read_records(str(archives_out / "validation-00000-of-00002"))[0]
    assert record["filename"].startswith("ILSVRC2012_val_") and record["boxes"] == []


def test_two_tasks_share_the_indexing_and_equal_one_run(demo_archives, archives_out, tmp_path,
                                                        caplog):
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    first = run_convert(demo_archives, out, num_tasks=2, task_index=0)
    assert first["manifest"] is None
    # task 0 indexed its 6 units (k % 2 == 0 of 12), then the 6 task 1 had not done yet
    assert "indexing 6 of 12 archive units" in caplog.text
    caplog.clear()
    second = run_convert(demo_archives, out, num_tasks=2, task_index=1)
    assert second["manifest"] is not None
    assert "indexing" not in caplog.text  # task 1 found every index made
    assert tree(out) == tree(archives_out)


def test_resume_and_rerun_read_no_archive_again(demo_archives, archives_out, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(archives_out, out)
    (out / "train-00002-of-00004").unlink()
    (out / "_shards/train-00002-of-00004.json").unlink()
    (out / "manifest.json").unlink()
    caplog.set_level(logging.INFO)
    result = run_convert(demo_archives, out)
    assert result["written"] == ["train-00002-of-00004"]
    assert "indexing" not in caplog.text
    assert tree(out) == tree(archives_out)


def test_a_replaced_archive_is_indexed_again(demo_archives, archives_out, tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(demo_archives, raw)
    out = tmp_path / "out"
    shutil.copytree(archives_out, out)
    data = (raw / archives.VALIDATION).read_bytes()
    (raw / archives.VALIDATION).unlink()
    (raw / archives.VALIDATION).write_bytes(data)  # the same bytes, a new version
    caplog.set_level(logging.INFO)
    assert run_convert(raw, out)["written"] == []
    assert "indexing 1 of 12 archive units" in caplog.text
    assert without_index(tree(out)) == without_index(tree(archives_out))


# ------------------------------------------------------------------------------- bad archives


def tar_bytes(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def bad_archive_cases(archives_dir: Path, tmp: Path) -> dict:
    """name -> (raw dir, the one-line error expected)"""
    def variant(change) -> Path:
        raw = tmp / f"raw-{len(list(tmp.iterdir()))}"
        shutil.copytree(archives_dir, raw)
        change(raw)
        return raw

    def cut(name: str, fraction: float):
        def change(raw: Path):
            data = (raw / name).read_bytes()
            (raw / name).write_bytes(data[:int(len(data) * fraction)])
        return change

    def train_member_not_a_tar(raw: Path):
        members = members_of(raw / archives.TRAIN)
        members["n00000003.tar"] = b"\xff\xd8 a JPEG, not a tar " * 40
        (raw / archives.TRAIN).write_bytes(tar_bytes(members))

    def devkit(members_change):
        def change(raw: Path):
            members = members_of(raw / archives.DEVKIT)
            (raw / archives.DEVKIT).write_bytes(tar_bytes(members_change(members), gz=True))
        return change

    def drop_truth(members):
        return {k: v for k, v in members.items() if not k.endswith(archives.GROUND_TRUTH)}

    def devkit_2010(members):
        return {k.replace("2012", "2010").replace("devkit_t12", "devkit-1.0"): v
                for k, v in members.items()}

    def only_2011(raw: Path):
        for name in archives.OFFICIAL:
            (raw / name).unlink()
        (raw / "ILSVRC2011_images_train.tar").write_bytes(b"")

    def val_2010(raw: Path):
        members = members_of(raw / archives.VALIDATION)
        (raw / archives.VALIDATION).write_bytes(tar_bytes(
            {k.replace("2012", "2010"): v for k, v in members.items()}))

    return {
        "train cut short": (variant(cut(archives.TRAIN, 0.5)),
                            r"ILSVRC2012_img_train.tar is truncated"),
        "validation cut short": (variant(cut(archives.VALIDATION, 0.7)),
                                 r"ILSVRC2012_img_val.tar is truncated"),
        "devkit cut short": (variant(cut(archives.DEVKIT, 0.6)),
                             r"ILSVRC2012_devkit_t12.tar.gz is truncated or not a .tar.gz"),
        "class member not a tar": (variant(train_member_not_a_tar),
                                   r"ILSVRC2012_img_train.tar member n00000003.tar is not a tar "
                                   r"archive"),
        "no ground truth": (variant(devkit(drop_truth)),
                            r"has no ILSVRC2012_devkit_t12/data/"
                            r"ILSVRC2012_validation_ground_truth.txt: it is not the complete"),
        "devkit of 2010": (variant(devkit(devkit_2010)), r"is the devkit of ILSVRC2010"),
        "validation of 2010": (variant(val_2010), r"holds ILSVRC2010_val_00000001.JPEG: an "
                                                  r"image of ILSVRC2010, not ILSVRC2012"),
        "archives of 2011": (variant(only_2011), r"ILSVRC2011_images_train.tar is an archive of "
                                                 r"ILSVRC2011, not ILSVRC2012"),
        "one archive missing": (variant(lambda raw: (raw / archives.BOXES).unlink()),
                                r"but not ILSVRC2012_bbox_train_v2.tar.gz: put all four"),
    }


def test_bad_archives_are_refused_with_one_line_naming_the_file(demo_archives, tmp_path, capsys):
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    for name, (raw, pattern) in bad_archive_cases(demo_archives, cases_dir).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        status = cli.main(["convert", "--raw-dir", str(raw), "--output-dir", str(out),
                           "--train-shards", "4", "--validation-shards", "2", "--workers", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert re.search(pattern, err[0]), (name, err)
        # nothing half-written: no shard, no temporary file; only complete indexes, if any
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) \
            if out.exists() else []
        assert all(w.startswith(CACHE) and w.endswith(".json") for w in written), (name, written)
        for w in written:
            json.loads((out / w).read_text())


def test_a_bad_archive_keeps_the_complete_shards(demo_archives, archives_out, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(demo_archives, raw)
    out = tmp_path / "out"
    shutil.copytree(archives_out, out)
    for name in ("validation-00001-of-00002", "_shards/validation-00001-of-00002.json",
                 "manifest.json"):
        (out / name).unlink()
    before = tree(out)
    data = (raw / archives.VALIDATION).read_bytes()
    (raw / archives.VALIDATION).unlink()
    (raw / archives.VALIDATION).write_bytes(data[:len(data) // 2])
    status = cli.main(["convert", "--raw-dir", str(raw), "--output-dir", str(out),
                       "--train-shards", "4", "--validation-shards", "2", "--workers", "2"])
    assert status == 2
    assert "ILSVRC2012_img_val.tar is truncated" in capsys.readouterr().err
    after = tree(out)
    assert without_index(after) == without_index(before)  # the five complete shards are kept


def test_validation_samples_come_out_of_the_archive_with_their_synsets(demo_raw, demo_archives,
                                                                       tmp_path):
    samples = archives.validation_samples(str(demo_archives), 3, str(tmp_path / "samples"))
    labels = (Path(demo_raw) / "validation_labels.txt").read_text().split()
    assert [(Path(p).name, w) for p, w in samples] == \
        [(f"ILSVRC2012_val_{n:08d}.JPEG", labels[n - 1]) for n in (1, 2, 3)]
    for path, _ in samples:
        assert Path(path).read_bytes() == \
            (Path(demo_raw) / "validation" / Path(path).name).read_bytes()


def test_run_local_predicts_the_same_samples_from_either_layout(demo_raw, demo_archives,
                                                                 tmp_path):
    """run-local's predict step: the first validation images and their synsets, whether the raw
    data is the extracted layout (read in place) or the archives (copied out of the tar)."""
    from pipelines import run_local

    extracted = run_local._validation_samples(demo_raw, 4, str(tmp_path / "unused"))
    from_tar = run_local._validation_samples(str(demo_archives), 4, str(tmp_path / "samples"))
    labels = (Path(demo_raw) / "validation_labels.txt").read_text().split()
    expected = [(f"ILSVRC2012_val_{n:08d}.JPEG", labels[n - 1]) for n in (1, 2, 3, 4)]
    assert [(Path(p).name, w) for p, w in extracted] == expected
    assert [(Path(p).name, w) for p, w in from_tar] == expected
    assert [Path(p).parent for p, _ in extracted] == [Path(demo_raw) / "validation"] * 4
    assert not (tmp_path / "unused").exists()
    for (a, _), (b, _) in zip(extracted, from_tar):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_sample_data_archives_cli_same_seed_same_bytes(demo_archives, tmp_path, capsys):
    assert cli.main(["sample-data", "--archives", "--per-class", "20", "--output-dir",
                     str(tmp_path / "raw")]) == 0
    assert "as the four ILSVRC2012 archives" in capsys.readouterr().out
    assert files_of(tmp_path / "raw") == files_of(demo_archives)
