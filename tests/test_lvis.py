"""LVIS v1 open-vocabulary instance segmentation (docs/lvis.md): the LVIS-format reader, the
rare-classes-unseen split, the manifest wiring and the LVIS mask-AP evaluator, on LVIS-format
files the tests build from the real COCO images and polygons of ../shared/data/coco-tiny."""

import copy
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pading.classes import ClassTable, lvis_v1_categories, zero_shot_split
from pading.cli import main as cli_main
from pading.config import DataConfig, load_config
from pading.data import read_lvis_index
from pading.data.lvis import lvis_image_location
from pading.data.manifest import apply_seen_only_filter, class_table_for, read_split_index, to_rows, validate_rows
from pading.errors import AnnotationError
from pading.evaluation.metrics import LVIS_MAX_DETECTIONS, _top_per_image, evaluate_lvis
from pading.evaluation.predict import summarize, tasks_for

REPO = Path(__file__).resolve().parents[1]
SPLIT = "ovis_lvis_v1_rare"
VAL_FROM_TRAIN = 5  # COCO train images moved into the LVIS val file (LVIS v1 val draws from both)


def _frequencies(train: dict) -> dict[int, str]:
    """LVIS's rule, scaled to 50 images: r = in at most 1 training image, c = 2-4, f = 5 or more."""
    images = defaultdict(set)
    for ann in train["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
    return {c["id"]: "r" if len(images[c["id"]]) <= 1 else "c" if len(images[c["id"]]) <= 4 else "f"
            for c in train["categories"]}


def _lvis_file(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """LVIS v1 form: coco_url and no file_name, no iscrowd, polygons only, per-image
    neg_category_ids (3 absent categories) and not_exhaustive_category_ids (every 4th image)."""
    by_image = defaultdict(set)
    for ann in annotations:
        by_image[ann["image_id"]].add(ann["category_id"])
    all_ids = sorted(c["id"] for c in categories)
    out_images = []
    for position, image in enumerate(sorted(images, key=lambda i: i["id"])):
        present = sorted(by_image[image["id"]])
        out_images.append({
            "id": image["id"], "height": image["height"], "width": image["width"], "coco_url": image["coco_url"],
            "license": image["license"], "date_captured": image["date_captured"],
            "neg_category_ids": [i for i in all_ids if i not in present][position % 7:position % 7 + 3],
            "not_exhaustive_category_ids": present[:1] if position % 4 == 0 else [],
        })
    return {"info": {"description": "LVIS-format test file from coco-tiny"}, "images": out_images,
            "annotations": annotations, "categories": categories}


@pytest.fixture(scope="module")
def lvis_data(coco_tiny, tmp_path_factory):
    """``{"dir", "train_json", "val_json", "train", "val", "frequency"}``: LVIS-format files of
    coco-tiny; the val file holds the 50 val images plus 5 train images (folder from coco_url)."""
    train = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    val = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    frequency = _frequencies(train)
    categories = [{"id": c["id"], "name": c["name"].replace(" ", "_"), "synonyms": [c["name"].replace(" ", "_")],
                   "frequency": frequency[c["id"]], "synset": f"{c['name'].replace(' ', '_')}.n.01", "def": ""}
                  for c in train["categories"]]

    def polygons(data, image_ids):
        return [{k: v for k, v in a.items() if k != "iscrowd"} for a in data["annotations"]
                if a["image_id"] in image_ids and not a["iscrowd"]]

    train_ids = sorted(i["id"] for i in train["images"])
    moved = set(train_ids[:VAL_FROM_TRAIN])
    kept = set(train_ids) - moved
    val_ids = {i["id"] for i in val["images"]}
    lvis_train = _lvis_file([i for i in train["images"] if i["id"] in kept], polygons(train, kept), categories)
    lvis_val = _lvis_file(val["images"] + [i for i in train["images"] if i["id"] in moved],
                          polygons(val, val_ids) + polygons(train, moved), categories)
    directory = tmp_path_factory.mktemp("lvis")
    (directory / "lvis_v1_train.json").write_text(json.dumps(lvis_train))
    (directory / "lvis_v1_val.json").write_text(json.dumps(lvis_val))
    return {"dir": directory, "train_json": directory / "lvis_v1_train.json", "val_json": directory / "lvis_v1_val.json",
            "train": lvis_train, "val": lvis_val, "frequency": frequency, "moved": moved}


# ---- reading ---------------------------------------------------------------------------------


def test_reader_gives_one_record_per_image_with_the_folder_from_coco_url(lvis_data, coco_tiny):
    records, categories, rejects = read_lvis_index(lvis_data["val_json"], coco_tiny / "val2017", "val")
    val = lvis_data["val"]
    assert rejects == []
    assert [r.image_id for r in records] == sorted(i["id"] for i in val["images"])
    assert categories == val["categories"]
    annotations = defaultdict(list)
    for ann in val["annotations"]:
        annotations[ann["image_id"]].append(ann)
    for record in records:
        image = next(i for i in val["images"] if i["id"] == record.image_id)
        folder, name = image["coco_url"].split("/")[-2:]
        assert record.file_name == name and record.split == "val"
        assert Path(record.image_path) == coco_tiny / folder / name and Path(record.image_path).is_file()
        assert (folder == "train2017") == (record.image_id in lvis_data["moved"])
        assert (record.height, record.width) == (image["height"], image["width"])
        expected = sorted(annotations[record.image_id], key=lambda a: a["id"])
        assert [s.id for s in record.segments] == [a["id"] for a in expected]
        assert [s.category_id for s in record.segments] == [a["category_id"] for a in expected]
        assert all(not s.iscrowd and json.loads(s.segmentation) == a["segmentation"]
                   for s, a in zip(record.segments, expected))
    assert sum(len(r.segments) for r in records) == len(val["annotations"])


def test_image_location_rules(tmp_path):
    image_dir = tmp_path / "coco" / "val2017"
    url = {"coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg"}
    assert lvis_image_location(url, image_dir) == ("000000000009.jpg", tmp_path / "coco" / "train2017" / "000000000009.jpg")
    both = {**url, "file_name": "other.jpg"}  # coco_url wins: it names the folder
    assert lvis_image_location(both, image_dir)[1] == tmp_path / "coco" / "train2017" / "000000000009.jpg"
    assert lvis_image_location({"file_name": "a.jpg"}, image_dir) == ("a.jpg", image_dir / "a.jpg")
    assert lvis_image_location({"coco_url": "b.jpg"}, image_dir) == ("b.jpg", image_dir / "b.jpg")
    with pytest.raises(ValueError, match="neither"):
        lvis_image_location({"coco_url": ""}, image_dir)


def test_bad_records_become_rejects_naming_the_record(lvis_data, coco_tiny, tmp_path):
    data = copy.deepcopy(lvis_data["train"])
    images = data["images"]
    by_id = {i["id"]: i for i in images}
    first_ann = data["annotations"][0]
    image_of = defaultdict(list)
    for ann in data["annotations"]:
        image_of[ann["image_id"]].append(ann)
    ids = sorted(image_of)
    no_location, file_name_only, bad_neg, unknown_cat, negative_cat, bad_polygon = ids[:6]
    del by_id[no_location]["coco_url"]
    del by_id[file_name_only]["coco_url"]
    by_id[file_name_only]["file_name"] = f"{file_name_only:012d}.jpg"
    by_id[bad_neg]["neg_category_ids"] = [99999]
    image_of[unknown_cat][0]["category_id"] = 99999
    ann = image_of[negative_cat][0]
    by_id[negative_cat]["neg_category_ids"] = [ann["category_id"]]
    image_of[bad_polygon][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    data["annotations"].append({**first_ann, "id": 10**9, "image_id": 424242})  # no such image
    duplicate = ids[6]
    images.append({**by_id[duplicate], "coco_url": "http://images.cocodataset.org/val2017/elsewhere.jpg"})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))

    records, _, rejects = read_lvis_index(path, coco_tiny / "train2017", "train")
    reasons = {(r.key, r.reason) for r in rejects}
    assert all(r.source == str(path) for r in rejects)
    assert (f"image_id={no_location}", "image entry has neither 'coco_url' nor 'file_name'") in reasons
    assert (f"image_id={bad_neg}", "image entry neg_category_ids has unknown category id 99999") in reasons
    assert (f"annotation id={image_of[unknown_cat][0]['id']}", "instance annotation unknown category id 99999") in reasons
    assert (f"annotation id={ann['id']}",
            f"instance annotation category id {ann['category_id']} is in the image's neg_category_ids") in reasons
    assert (f"annotation id={image_of[bad_polygon][0]['id']}",
            "instance annotation segmentation polygon needs an even number (>= 6) of coordinates") in reasons
    assert (f"annotation id={10**9}", "instance annotation image id 424242 has no usable entry in 'images'") in reasons
    for image_id in (unknown_cat, negative_cat, bad_polygon):
        assert (f"image_id={image_id}", "image has an unusable instance annotation") in reasons
    rejected = {no_location, bad_neg, unknown_cat, negative_cat, bad_polygon, duplicate}
    assert {r.image_id for r in records} == {i["id"] for i in images} - rejected
    # An image entry rejected takes its annotations with it (they have no usable image).
    assert sum(1 for r in rejects if r.reason.endswith("has no usable entry in 'images'")) == \
        len(image_of[no_location]) + len(image_of[bad_neg]) + len(image_of[duplicate]) + 1
    # Both entries of a repeated id are rejected: which one the annotations mean is unknowable.
    assert sum(r.key == f"image_id={duplicate}" and r.reason == f"image entry repeats image id {duplicate} "
               "(2 entries of 'images' have it)" for r in rejects) == 2
    record = next(r for r in records if r.image_id == file_name_only)  # file_name: read from the split's folder
    assert Path(record.image_path) == coco_tiny / "train2017" / f"{file_name_only:012d}.jpg"


def test_category_without_frequency_makes_the_file_unusable(lvis_data, coco_tiny, tmp_path):
    data = copy.deepcopy(lvis_data["val"])
    del data["categories"][3]["frequency"]
    path = tmp_path / "nofreq.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="frequency") as info:
        read_lvis_index(path, coco_tiny / "val2017", "val")
    assert str(path) in str(info.value)


# ---- the split -----------------------------------------------------------------------------


def test_shipped_split_marks_the_337_rare_classes_unseen(shared_data):
    table = ClassTable.from_split(SPLIT)
    categories = lvis_v1_categories()
    assert table.num_classes == 1203 and len(table.unseen_indices) == 337
    assert {c.name for c in table if c.unseen} == {c["name"] for c in categories if c["frequency"] == "r"}
    assert sorted(zero_shot_split(SPLIT)["unseen"]) == sorted(c.name for c in table if c.unseen)
    shipped = json.loads((shared_data / "lvis_v1_categories.json").read_text())["categories"]
    assert categories == shipped
    assert table[table.index_of_name("aerosol_can")].text == "aerosol can"


def test_split_follows_the_dataset_frequency_tags(lvis_data):
    categories = lvis_data["val"]["categories"]
    table = ClassTable.from_split(SPLIT, categories=categories)
    assert table.num_classes == 80
    assert table.unseen_ids == {c["id"] for c in categories if c["frequency"] == "r"}
    assert 0 < len(table.unseen_ids) < 80


def test_manifest_reads_lvis_and_keeps_or_drops_rare_training_images(lvis_data, coco_tiny):
    data = DataConfig(root=str(coco_tiny), format="lvis", split=SPLIT, train_lvis_json=str(lvis_data["train_json"]),
                      val_lvis_json=str(lvis_data["val_json"]))
    assert data.instances_json("val") == str(lvis_data["val_json"]) and tasks_for("lvis") == ("instance",)
    records, categories, rejects = read_split_index(data, "train")
    assert rejects == [] and len(records) == 50 - VAL_FROM_TRAIN
    table = class_table_for(data, categories)
    rows = to_rows(records, table)
    with_rare = {r["image_id"] for r in rows if r["has_unseen"]}
    assert with_rare, "the test data must have training images with rare classes"
    kept, dropped = apply_seen_only_filter(rows, table, "drop_images")
    assert {r["image_id"] for r in dropped} == with_rare and len(kept) == len(rows) - len(with_rare)
    kept, dropped = apply_seen_only_filter(rows, table, "drop_annotations")
    assert dropped == [] and [r["image_id"] for r in kept] == [r["image_id"] for r in rows]
    for before, after in zip(rows, kept):
        assert [s["id"] for s in after["segments"]] == [s["id"] for s in before["segments"]
                                                        if s["category_id"] not in table.unseen_ids]
    # Images and polygon targets load (the prepare stage's check), rare instances left out after the filter.
    sample = [r for r in kept if r["image_id"] in with_rare][:2]
    good, bad = validate_rows(sample, table, "lvis")
    assert bad == [] and len(good) == 2


def test_lvis_config_loads():
    config = load_config(REPO / "configs" / "ovis_lvis.yaml")
    assert config.data.format == "lvis" and config.data.split == SPLIT
    assert config.segmenter.preset == "r50" and config.inference.instance_top_k == LVIS_MAX_DETECTIONS
    assert config.data.unseen_in_train == "drop_annotations"


# ---- evaluation ----------------------------------------------------------------------------


def _as_results(data: dict, score: float = 0.9) -> list[dict]:
    """Every GT annotation as a detection (RLE, as the evaluate stage writes them)."""
    sizes = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
    results = []
    for ann in data["annotations"]:
        height, width = sizes[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], height, width))
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": score,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return results


def _square(data: dict, image_id: int, category_id: int, score: float) -> dict:
    """A 3x3 detection in the image's top-left corner (matches no GT)."""
    image = next(i for i in data["images"] if i["id"] == image_id)
    mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    mask[:3, :3] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"image_id": image_id, "category_id": category_id, "score": score, "bbox": [0.0, 0.0, 3.0, 3.0],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}


@pytest.fixture(scope="module")
def ground_truth_report(lvis_data):
    return evaluate_lvis(lvis_data["val_json"], _as_results(lvis_data["val"]))


def test_ground_truth_as_predictions_scores_100(lvis_data, ground_truth_report):
    report = ground_truth_report
    val = lvis_data["val"]
    frequency = {c["id"]: c["frequency"] for c in val["categories"]}
    with_gt = {a["category_id"] for a in val["annotations"]}
    assert report["All"]["n"] == len(with_gt)
    assert report["Unseen"]["n"] == sum(frequency[i] == "r" for i in with_gt) > 0
    for group in ("All", "Seen", "Unseen"):
        assert report[group]["ap"] == pytest.approx(100.0)
    assert report["HM"]["ap"] == pytest.approx(100.0)
    lvis = report["LVIS"]
    for key in ("ap", "ap50", "ap75", "ap_r", "ap_c", "ap_f", "ar"):
        assert lvis[key] == pytest.approx(100.0), key
    assert (lvis["n_r"], lvis["n_c"], lvis["n_f"]) == tuple(sum(frequency[i] == t for i in with_gt) for t in "rcf")


def test_lvis_rules_for_unlisted_and_not_exhaustive_categories(lvis_data):
    """A detection of a category neither annotated nor negative in the image is not
    evaluated; an unmatched one of a not-exhaustive category is not a false positive."""
    val = lvis_data["val"]
    present = defaultdict(set)
    for ann in val["annotations"]:
        present[ann["image_id"]].add(ann["category_id"])
    extra = []
    for image in val["images"]:
        listed = present[image["id"]] | set(image["neg_category_ids"])
        unlisted = next(c["id"] for c in val["categories"] if c["id"] not in listed)
        extra.append(_square(val, image["id"], unlisted, 1.0))
        extra += [_square(val, image["id"], c, 1.0) for c in image["not_exhaustive_category_ids"]]
    assert any(image["not_exhaustive_category_ids"] for image in val["images"])
    report = evaluate_lvis(lvis_data["val_json"], _as_results(val) + extra)
    assert report["LVIS"]["ap"] == pytest.approx(100.0) and report["All"]["ap"] == pytest.approx(100.0)


def test_false_positive_of_a_negative_category_gives_the_exact_ap(lvis_data):
    """One top-scoring false positive of category X (negative in its image) before X's n
    true positives: interpolated precision n/(n+1) at every recall, so AP_X = n/(n+1)."""
    val = lvis_data["val"]
    counts = defaultdict(int)
    for ann in val["annotations"]:
        counts[ann["category_id"]] += 1
    image, category = next((i, c) for i in val["images"] for c in i["neg_category_ids"] if counts[c] > 0)
    n = counts[category]
    report = evaluate_lvis(lvis_data["val_json"], _as_results(val) + [_square(val, image["id"], category, 1.0)])
    assert report["per_class"][category]["ap"] == pytest.approx(100.0 * n / (n + 1))
    others = [v["ap"] for k, v in report["per_class"].items() if k != category]
    assert others == pytest.approx([100.0] * len(others))
    expected = (100.0 * (len(others)) + 100.0 * n / (n + 1)) / (len(others) + 1)
    assert report["LVIS"]["ap"] == pytest.approx(expected) and report["All"]["ap"] == pytest.approx(expected)


def test_perturbed_predictions_score_lower(lvis_data, ground_truth_report):
    val = lvis_data["val"]
    frequency = {c["id"]: c["frequency"] for c in val["categories"]}
    # No rare detections: AP_r = Unseen = 0, the other groups stay perfect.
    no_rare = [r for r in _as_results(val) if frequency[r["category_id"]] != "r"]
    report = evaluate_lvis(lvis_data["val_json"], no_rare)
    assert report["LVIS"]["ap_r"] == pytest.approx(0.0) and report["Unseen"]["ap"] == pytest.approx(0.0)
    assert report["LVIS"]["ap_c"] == pytest.approx(100.0) and report["LVIS"]["ap_f"] == pytest.approx(100.0)
    assert report["Seen"]["ap"] == pytest.approx(100.0) and report["HM"]["ap"] == 0.0
    assert report["LVIS"]["ap"] == pytest.approx(100.0 * report["Seen"]["n"] / report["All"]["n"])
    # Masks shifted by 8 pixels: lower AP everywhere, and the evaluator's AP_r is our Unseen mean.
    shifted = []
    for record in _as_results(val):
        mask = mask_utils.decode(record["segmentation"])
        mask = np.roll(mask, 8, axis=1)
        rle = mask_utils.encode(np.asfortranarray(mask))
        shifted.append({**record, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    report = evaluate_lvis(lvis_data["val_json"], shifted)
    assert 0.0 < report["LVIS"]["ap"] < ground_truth_report["LVIS"]["ap"]
    assert report["LVIS"]["ap50"] > report["LVIS"]["ap75"]
    assert report["LVIS"]["ap_r"] == pytest.approx(report["Unseen"]["ap"])
    assert report["LVIS"]["ap"] == pytest.approx(report["All"]["ap"])


def test_at_most_300_detections_per_image():
    results = [{"image_id": i % 2, "category_id": 1, "score": float(i), "segmentation": {}} for i in range(700)]
    kept = _top_per_image(results, LVIS_MAX_DETECTIONS)
    assert len(kept) == 2 * LVIS_MAX_DETECTIONS
    for image_id in (0, 1):
        scores = sorted(r["score"] for r in kept if r["image_id"] == image_id)
        assert scores[0] == min(s for s in range(700 - 600 + image_id, 700) if s % 2 == image_id)


def test_summarize_reports_lvis_on_the_evaluated_images(lvis_data, tmp_path):
    val = lvis_data["val"]
    table = ClassTable.from_split(SPLIT, categories=val["categories"])
    detections = defaultdict(list)
    for record in _as_results(val):
        detections[record["image_id"]].append(record)
    evaluated = sorted(i["id"] for i in val["images"])[:20]
    rows = [{"image_id": i, "file_name": "", "panoptic": "", "instances": json.dumps(detections[i]), "gt_instances": "",
             "error": ""} for i in evaluated]
    results = summarize(rows, table, "lvis", tmp_path, gt_instances_json=lvis_data["val_json"],
                        images=[{"image_id": i} for i in evaluated])
    assert results["lvis"]["all"]["ap"] == pytest.approx(100.0)
    assert results["reports"]["lvis"]["All"]["n"] == len({a["category_id"] for a in val["annotations"]
                                                          if a["image_id"] in set(evaluated)})
    # An image that could not be predicted is evaluated as a miss, not left out.
    rows[0] = {**rows[0], "instances": "", "error": "broken"}
    results = summarize(rows, table, "lvis", tmp_path, gt_instances_json=lvis_data["val_json"],
                        images=[{"image_id": i} for i in evaluated])
    assert results["lvis"]["all"]["ap"] < 100.0
    assert json.loads((tmp_path / "instance_predictions.json").read_text())


def test_numbers_match_the_official_lvis_api(lvis_data):
    """Shifted, dropped and rescored GT plus 3 random 3x3 detections per image: the numbers the
    official lvis-api (0.5.3, with its ``np.float`` replaced so it runs on NumPy 2) gives for
    these files, to 4 decimals (docs/lvis.md)."""
    rng = random.Random(0)
    val = lvis_data["val"]
    results = []
    for record in _as_results(val):
        if rng.random() < 0.2:
            continue
        mask = np.roll(mask_utils.decode(record["segmentation"]), rng.randint(0, 12), axis=rng.randint(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        results.append({**record, "score": rng.random(), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    category_ids = [c["id"] for c in val["categories"]]
    for image in val["images"]:
        results += [_square(val, image["id"], rng.choice(category_ids), rng.random()) for _ in range(3)]
    lvis = evaluate_lvis(lvis_data["val_json"], results)["LVIS"]
    official = {"ap": 0.3174, "ap50": 0.527, "ap75": 0.3116, "aps": 0.147, "apm": 0.3988, "apl": 0.5296,
                "ap_r": 0.3233, "ap_c": 0.3225, "ap_f": 0.3016, "ar": 0.372}
    assert {k: round(lvis[k] / 100, 4) for k in official} == official


def test_cli_evaluates_lvis_results(lvis_data, tmp_path, capsys):
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(_as_results(lvis_data["val"])))
    assert cli_main(["evaluate", "lvis", "--gt-json", str(lvis_data["val_json"]), "--pred-json", str(predictions)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["LVIS"]["ap"] == pytest.approx(100.0) and report["Unseen"]["n"] == report["LVIS"]["n_r"]
