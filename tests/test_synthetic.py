"""The synthetic embedded-default dataset: real COCO formats, unseen classes, determinism."""

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy.stats import spearmanr

from pading.data import (
    load_image,
    load_instance_targets,
    load_panoptic_targets,
    load_semantic_targets,
    read_instances_index,
    read_panoptic_index,
    read_panoptic_png,
    read_semantic_index,
    seen_only_filter,
    synthetic_table,
    write_synthetic_dataset,
)
from pading.data.synthetic import class_appearances, reference_embeddings
from pading.errors import ConfigError

SIZE = 48
COUNTS = {"train": 12, "val": 8}


def _write(root: Path, seed: int, **kwargs) -> dict:
    return write_synthetic_dataset(root, num_train=COUNTS["train"], num_val=COUNTS["val"], image_size=SIZE,
                                   seed=seed, **kwargs)


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, _write(root, seed=0)


@pytest.fixture(scope="module")
def table():
    return synthetic_table("zsp_coco_panoptic_14")


def _panoptic(root: Path, split: str):
    return read_panoptic_index(root / "annotations" / f"panoptic_{split}2017.json", root / f"{split}2017",
                               root / f"panoptic_{split}2017", split)


def test_vocabulary(table):
    assert 18 <= table.num_classes <= 24
    unseen = {table[i].name for i in table.unseen_indices}
    assert {"cow", "giraffe", "grass-merged", "road", "tree-merged"} <= unseen
    assert any(table[i].isthing for i in table.unseen_indices)
    assert any(not table[i].isthing for i in table.unseen_indices)
    assert len(table.seen_indices) >= 3 * len(table.unseen_indices)


def test_layout_and_categories(synth, table):
    root, summary = synth
    for split, count in COUNTS.items():
        jpgs = sorted((root / f"{split}2017").glob("*.jpg"))
        assert len(jpgs) == count and all(len(p.stem) == 12 and p.stem.isdigit() for p in jpgs)
        assert len(list((root / f"panoptic_{split}2017").glob("*.png"))) == count
        assert len(list((root / "stuffthingmaps" / f"{split}2017").glob("*.png"))) == count
        panoptic = json.loads((root / "annotations" / f"panoptic_{split}2017.json").read_text())
        assert [c["id"] for c in panoptic["categories"]] == sorted(table.ids)
        instances = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        assert all(c["isthing"] for c in instances["categories"])
    assert summary["classes"] == table.names


def test_panoptic_png_ids_match_json(synth):
    root, _ = synth
    for split in COUNTS:
        data = json.loads((root / "annotations" / f"panoptic_{split}2017.json").read_text())
        for ann in data["annotations"]:
            ids = read_panoptic_png(root / f"panoptic_{split}2017" / ann["file_name"])
            assert ids.shape == (SIZE, SIZE)
            present = set(np.unique(ids).tolist()) - {0}
            assert present == {s["id"] for s in ann["segments_info"]}
            for s in ann["segments_info"]:
                assert int((ids == s["id"]).sum()) == s["area"] > 0


def test_loads_through_the_same_readers(synth, table):
    root, summary = synth
    for split, count in COUNTS.items():
        records, categories, rejects = _panoptic(root, split)
        assert len(records) == count and rejects == []
        instance_records, _, instance_rejects = read_instances_index(
            root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017", split)
        assert instance_rejects == []
        semantic_records, semantic_categories, semantic_rejects = read_semantic_index(
            root / f"{split}2017", root / "stuffthingmaps" / f"{split}2017", split)
        assert semantic_rejects == [] and [c["id"] for c in semantic_categories] == sorted(table.ids)
        for record, instance_record, semantic_record in zip(records, instance_records, semantic_records):
            assert load_image(record.image_path).shape == (SIZE, SIZE, 3)
            panoptic_targets = load_panoptic_targets(record, table)
            by_segment = dict(zip(panoptic_targets.segment_ids.tolist(), panoptic_targets.masks))
            instance_targets = load_instance_targets(instance_record, table)
            things = [s for s in record.segments if table[table.index_of_id(s.category_id)].isthing]
            assert len(instance_targets) == len(things)
            for mask, segment in zip(instance_targets.masks, things):  # polygons/RLE = the visible pixels
                assert (mask == by_segment[segment.id]).all()
            semantic_targets = load_semantic_targets(semantic_record, table)
            for mask, category_id in zip(semantic_targets.masks, semantic_targets.category_ids):
                union = panoptic_targets.masks[panoptic_targets.category_ids == category_id].any(axis=0)
                assert (mask == union).all()
    train_records, _, _ = _panoptic(root, "train")
    kept, dropped = seen_only_filter(train_records, table)
    assert len(dropped) == summary["train_with_unseen"] and len(kept) == summary["train_seen_only"]


def test_loads_through_pycocotools(synth):
    root, _ = synth
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == COUNTS["val"]
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert int(coco.annToMask(ann).sum()) == ann["area"]


def test_crowd_and_void(tmp_path, table):
    summary = write_synthetic_dataset(tmp_path, num_train=3, num_val=1, image_size=32, crowd_probability=1.0,
                                      void_probability=1.0)
    assert summary["num_train"] == 3
    data = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)  # uncompressed RLE
    records, _, _ = read_instances_index(tmp_path / "annotations" / "instances_train2017.json",
                                         tmp_path / "train2017", "train")
    assert sum(int(load_instance_targets(r, table).iscrowd.sum()) for r in records) == len(crowds)
    panoptic_records, _, _ = _panoptic(tmp_path, "train")
    assert sum(s.iscrowd for r in panoptic_records for s in r.segments) == len(crowds)
    for record in panoptic_records:
        ids = read_panoptic_png(record.panoptic_path)
        labels = np.asarray(Image.open(tmp_path / "stuffthingmaps" / "train2017" / f"{record.image_id:012d}.png"))
        assert (ids == 0).any() and ((ids == 0) == (labels == 255)).all()


def test_unseen_classes_in_val(synth, table):
    root, summary = synth
    records, _, _ = _panoptic(root, "val")
    unseen = table.unseen_ids
    with_unseen = [r for r in records if any(s.category_id in unseen for s in r.segments)]
    assert 2 * len(with_unseen) >= len(records) and summary["val_with_unseen"] == len(with_unseen)


def test_every_unseen_class_in_five_val_images(tmp_path, table):
    write_synthetic_dataset(tmp_path, num_train=1, num_val=40, image_size=32)
    records, _, _ = _panoptic(tmp_path, "val")
    for index in table.unseen_indices:
        category_id = table[index].id
        assert sum(any(s.category_id == category_id for s in r.segments) for r in records) >= 5


def test_deterministic(synth, tmp_path):
    root, _ = synth
    _write(tmp_path / "again", seed=0)
    _write(tmp_path / "other", seed=1)
    reference = _hashes(root)
    assert len(reference) == 3 * sum(COUNTS.values()) + 5  # jpg + 2 png per image, 4 JSONs, categories
    assert _hashes(tmp_path / "again") == reference
    other = _hashes(tmp_path / "other")
    assert other.keys() == reference.keys()
    differing = [k for k in reference if other[k] != reference[k]]
    assert sum(k.endswith(".jpg") for k in differing) == sum(COUNTS.values())


def test_appearance_follows_semantics(table):
    looks = class_appearances("minilm")
    names, reference = reference_embeddings("minilm")
    embeddings = reference[[names.index(n) for n in table.names]]  # (C, 384)
    colours = np.array([looks[n].colour for n in table.names])  # (C, 3)
    upper = np.triu_indices(table.num_classes, 1)
    similarity = (embeddings @ embeddings.T)[upper]
    colour_distance = np.linalg.norm(colours[:, None] - colours[None], axis=-1)[upper]
    assert spearmanr(similarity, colour_distance).statistic < -0.2
    assert np.ptp(colours, axis=0).min() > 100  # colours spread over the cube


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        write_synthetic_dataset(tmp_path, num_train=0, num_val=1, image_size=32)
    with pytest.raises(ConfigError, match="no unseen class"):
        write_synthetic_dataset(tmp_path, num_train=1, num_val=1, image_size=32, split="zsi_coco_65_15")


def test_cli(tmp_path, capsys):
    from pading.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--train", "2", "--val", "3", "--size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["num_train"], summary["num_val"], summary["image_size"]) == (2, 3, 32)
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 3
