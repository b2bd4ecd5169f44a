"""pading.data.synthetic_lvis: the large-vocabulary embedded default in the real LVIS v1 format."""

import hashlib
import json

import numpy as np
import pytest

from pading.classes import ClassTable
from pading.config import DataConfig, SyntheticConfig
from pading.data import read_lvis_index
from pading.data.synthetic import ensure_synthetic_dataset
from pading.data.synthetic_lvis import write_synthetic_lvis_dataset
from pading.data.targets import decode_segmentation
from pading.evaluation.metrics import evaluate_lvis


@pytest.fixture(scope="module")
def synthetic_lvis(tmp_path_factory):
    root = tmp_path_factory.mktemp("slvis") / "coco"
    summary = write_synthetic_lvis_dataset(root, num_train=24, num_val=12, image_size=48, seed=3)
    return root, summary


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_it_reads_as_lvis_v1_with_the_1203_categories_and_their_tags(synthetic_lvis):
    root, summary = synthetic_lvis
    records, categories, rejects = read_lvis_index(root.parent / "lvis" / "lvis_v1_val.json", root / "val2017", "val")
    assert not rejects and len(records) == 12 and len(categories) == 1203
    assert {c["frequency"] for c in categories} == {"f", "c", "r"}
    table = ClassTable.from_split("ovis_lvis_v1_rare", categories=categories)
    assert len(table.unseen_indices) == 337
    assert all(r.image_path.endswith(f"val2017/{r.file_name}") for r in records)
    assert summary["val"]["objects_by_frequency"]["r"] >= 6  # half the val images hold a rare class


def test_objects_are_whole_non_overlapping_polygons_and_absent_classes_are_negative(synthetic_lvis):
    root, _ = synthetic_lvis
    data = json.loads((root.parent / "lvis" / "lvis_v1_val.json").read_text())
    all_ids = {c["id"] for c in data["categories"]}
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        masks = [decode_segmentation(a["segmentation"], image["height"], image["width"]) for a in anns]
        assert all(int(m.sum()) == a["area"] for m, a in zip(masks, anns))
        assert int(np.sum(masks, axis=0).max(initial=0)) <= 1  # no overlap
        present = {a["category_id"] for a in anns}
        assert set(image["neg_category_ids"]) == all_ids - present


def test_ground_truth_as_predictions_scores_100(synthetic_lvis):
    from pading.data.targets import mask_to_rle

    root, _ = synthetic_lvis
    gt = json.loads((root.parent / "lvis" / "lvis_v1_val.json").read_text())
    results = []
    for a in gt["annotations"]:
        image = next(i for i in gt["images"] if i["id"] == a["image_id"])
        mask = decode_segmentation(a["segmentation"], image["height"], image["width"])
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                        "segmentation": mask_to_rle(mask)})
    report = evaluate_lvis(gt, results)
    assert report["LVIS"]["ap"] == pytest.approx(100.0)


def test_same_arguments_give_identical_files_and_the_config_path_writes_it_once(synthetic_lvis, tmp_path):
    root, _ = synthetic_lvis
    again = tmp_path / "again" / "coco"
    write_synthetic_lvis_dataset(again, num_train=24, num_val=12, image_size=48, seed=3)
    assert _digest(again.parent) == _digest(root.parent)
    data = DataConfig(root=str(tmp_path / "cfg" / "coco"), format="lvis", split="ovis_lvis_v1_rare",
                      synthetic=SyntheticConfig(num_train=2, num_val=2, image_size=32))
    assert ensure_synthetic_dataset(data)["classes"] == 1203
    assert ensure_synthetic_dataset(data) is None  # there already
