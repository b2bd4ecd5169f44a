"""Evaluators: hand-computed PQ / mAP@0.5 / mIoU cases, real COCO samples, the CLI, bad input."""

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pading.classes import zero_shot_split
from pading.errors import AnnotationError, DataError
from pading.evaluation.metrics import (
    PanopticEvaluator,
    SemanticEvaluator,
    evaluate_instance,
    evaluate_panoptic,
    evaluate_semantic,
    harmonic_mean,
    resolve_unseen_ids,
)

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("All", "Things", "Stuff", "Seen", "Unseen")

# person (thing, seen), cow (thing, unseen), sky (stuff, seen)
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "cow", "isthing": 1},
    {"id": 3, "name": "sky-other-merged", "isthing": 0},
]
PERSON, COW, SKY = 1, 2, 3


def row(*ids):
    """A (1, W) id map from a list of pixel ids."""
    return np.array([ids], dtype=np.int64)


def segments(*pairs, crowd=()):
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def panoptic(gt_ids, gt_segments, pred_ids, pred_segments, unseen_ids=()):
    evaluator = PanopticEvaluator(CATEGORIES, unseen_ids=unseen_ids)
    evaluator.add(gt_ids, gt_segments, pred_ids, pred_segments)
    return evaluator.summarize()


# ------------------------------------------------------------------------------ panoptic
def test_pq_of_ground_truth_against_itself_is_100():
    gt = row(1, 1, 2, 2, 2, 3, 3, 0)
    segs = segments((1, PERSON), (2, COW), (3, SKY))
    report = panoptic(gt, segs, gt, segs, unseen_ids={COW})
    for group in GROUPS:
        assert report[group]["pq"] == pytest.approx(100.0)
        assert report[group]["sq"] == pytest.approx(100.0)
        assert report[group]["rq"] == pytest.approx(100.0)
    assert report["HM"]["pq"] == pytest.approx(100.0)
    assert (report["All"]["n"], report["Things"]["n"], report["Stuff"]["n"]) == (3, 2, 1)
    assert (report["Seen"]["n"], report["Unseen"]["n"]) == (2, 1)
    assert set(report["per_class"]) == {PERSON, COW, SKY}


def test_missed_segment_is_a_false_negative():
    gt = row(1, 1, 1, 1, 2, 2, 2, 2)
    pred = row(7, 7, 7, 7, 0, 0, 0, 0)  # the sky segment is not predicted
    report = panoptic(gt, segments((1, PERSON), (2, SKY)), pred, segments((7, PERSON)))
    assert report["per_class"][PERSON] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0})
    assert report["per_class"][SKY] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0})  # fn=1
    assert report["All"]["pq"] == pytest.approx(50.0) and report["All"]["n"] == 2
    assert report["Things"]["pq"] == pytest.approx(100.0) and report["Stuff"]["pq"] == pytest.approx(0.0)


def test_wrong_class_is_one_false_positive_and_one_false_negative():
    gt = row(1, 1, 1, 1, 2, 2, 2, 2)
    pred = row(5, 5, 5, 5, 6, 6, 6, 6)
    report = panoptic(gt, segments((1, PERSON), (2, SKY)), pred, segments((5, COW), (6, SKY)), unseen_ids={COW})
    assert report["per_class"][PERSON]["pq"] == pytest.approx(0.0)  # fn
    assert report["per_class"][COW]["pq"] == pytest.approx(0.0)  # fp
    assert report["per_class"][SKY]["pq"] == pytest.approx(100.0)
    assert report["All"]["n"] == 3 and report["All"]["pq"] == pytest.approx(100.0 / 3)
    assert report["Unseen"]["pq"] == 0.0 and report["HM"]["pq"] == 0.0
    assert report["Seen"]["pq"] == pytest.approx(50.0)


def test_unmatched_prediction_over_crowd_of_its_class_is_not_a_false_positive():
    gt = row(1, 1, 1, 1, 2, 2, 2, 2, 2, 2)  # 1 = person crowd region
    gt_segments = segments((1, PERSON), (2, SKY), crowd={1})
    pred = row(8, 8, 8, 8, 8, 9, 9, 9, 9, 9)  # 8: 4 of 5 pixels on the crowd
    report = panoptic(gt, gt_segments, pred, segments((8, PERSON), (9, SKY)))
    # person: crowd is no FN, prediction over it is no FP -> class absent from the means
    assert PERSON not in report["per_class"]
    # sky: intersection 5, union 5 + 6 - 5 = 6
    assert report["per_class"][SKY] == pytest.approx({"pq": 500 / 6, "sq": 500 / 6, "rq": 100.0})
    assert report["All"]["n"] == 1 and report["All"]["pq"] == pytest.approx(500 / 6)
    # a crowd region of another class does not excuse the prediction
    report = panoptic(gt, gt_segments, pred, segments((8, COW), (9, SKY)))
    assert report["per_class"][COW] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert report["All"]["n"] == 2


def test_void_pixels_are_left_out_of_iou_and_false_positives():
    gt = row(0, 0, 0, 0, 2, 2, 2, 2, 2, 2)  # 0 = unlabeled
    pred = row(4, 4, 3, 3, 3, 3, 3, 3, 3, 3)  # 3 spills 2 pixels onto void; 4 lies on void only
    report = panoptic(gt, segments((2, SKY)), pred, segments((3, SKY), (4, PERSON)))
    # IoU = 6 / (8 + 6 - 6 - 2) = 1, and the person segment on void is no FP
    assert report["per_class"] == {SKY: pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0})}


@pytest.mark.parametrize(
    "person_pixels, person_pq, sky_pq",
    [
        (5, 0.0, 100 * 10 / 15),  # IoU exactly 0.5: no match -> fp + fn
        (6, 60.0, 100 * 10 / 14),  # IoU 0.6: match
    ],
)
def test_match_needs_iou_strictly_above_one_half(person_pixels, person_pq, sky_pq):
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.array([[7] * person_pixels + [9] * (20 - person_pixels)])
    report = panoptic(gt, segments((1, PERSON), (2, SKY)), pred, segments((7, PERSON), (9, SKY)))
    assert report["per_class"][PERSON]["pq"] == pytest.approx(person_pq)
    assert report["per_class"][SKY]["pq"] == pytest.approx(sky_pq)
    assert report["per_class"][SKY]["rq"] == pytest.approx(100.0)


def test_iou_just_above_one_half_matches():
    gt = np.array([[1] * 100 + [0] * 10])
    pred = np.array([[7] * 51 + [0] * 59])
    report = panoptic(gt, segments((1, PERSON)), pred, segments((7, PERSON)))
    assert report["per_class"][PERSON] == pytest.approx({"pq": 51.0, "sq": 51.0, "rq": 100.0})


def test_merge_equals_single_pass_and_state_pickles():
    images = [
        (row(1, 1, 2, 2), segments((1, PERSON), (2, SKY)), row(1, 1, 1, 2), segments((1, PERSON), (2, SKY))),
        (row(1, 1, 1, 0), segments((1, COW)), row(3, 3, 0, 0), segments((3, PERSON))),
    ]
    single = PanopticEvaluator(CATEGORIES, unseen_ids={COW})
    parts = [PanopticEvaluator(CATEGORIES, unseen_ids={COW}) for _ in images]
    for part, image in zip(parts, images):
        single.add(*image)
        part.add(*image)
    merged = pickle.loads(pickle.dumps(parts[0])).merge(pickle.loads(pickle.dumps(parts[1])))
    assert merged.summarize() == single.summarize()


def test_png_id_not_in_segments_and_unknown_category_raise():
    with pytest.raises(AnnotationError, match="segment id 5"):
        panoptic(row(1, 1), segments((1, PERSON)), row(1, 5), segments((1, PERSON)))
    with pytest.raises(AnnotationError, match="unknown category_id 99"):
        panoptic(row(1, 1), segments((1, PERSON)), row(1, 1), segments((1, 99)))


def test_harmonic_mean():
    assert harmonic_mean(50.0, 100.0) == pytest.approx(200 / 3)
    assert harmonic_mean(0.0, 100.0) == 0.0


# ------------------------------------------------------------------- panoptic on real COCO
def zsp_unseen_ids(gt_json: Path) -> set:
    categories = json.loads(gt_json.read_text())["categories"]
    return resolve_unseen_ids(categories, zero_shot_split("zsp_coco_panoptic_14")["unseen"])


def test_real_coco_ground_truth_against_itself(coco_samples):
    gt_json, gt_dir = coco_samples / "panoptic_val2017.json", coco_samples / "panoptic_val2017"
    report = evaluate_panoptic(gt_json, gt_dir, gt_json, gt_dir, unseen_ids=zsp_unseen_ids(gt_json))
    for group in GROUPS:
        assert report[group]["n"] > 0
        assert report[group]["pq"] == pytest.approx(100.0)
    assert report["HM"] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0})


def test_real_coco_missing_prediction_counts_false_negatives(coco_samples, tmp_path, caplog):
    gt_json, gt_dir = coco_samples / "panoptic_val2017.json", coco_samples / "panoptic_val2017"
    data = json.loads(gt_json.read_text())
    kept, dropped = data["annotations"]
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": [kept]}))
    with caplog.at_level(logging.WARNING, logger="pading.evaluation.metrics"):
        report = evaluate_panoptic(gt_json, gt_dir, pred_json, gt_dir)
    assert any(str(dropped["image_id"]) in r.getMessage() for r in caplog.records)
    only_dropped = {s["category_id"] for s in dropped["segments_info"]} - {s["category_id"] for s in kept["segments_info"]}
    for category_id in only_dropped:  # classes only in the missing image: all FN
        assert report["per_class"][category_id]["pq"] == 0.0
    assert 0.0 < report["All"]["pq"] < 100.0


def test_real_coco_only_the_images_asked_for_are_scored(coco_samples, tmp_path, caplog):
    """An evaluation of part of val (data.max_val_images, or a manifest without the images
    prepare rejected) scores those images only: the others' segments are not misses."""
    gt_json, gt_dir = coco_samples / "panoptic_val2017.json", coco_samples / "panoptic_val2017"
    kept, dropped = json.loads(gt_json.read_text())["annotations"]
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": [kept]}))
    with caplog.at_level(logging.WARNING, logger="pading.evaluation.metrics"):
        report = evaluate_panoptic(gt_json, gt_dir, pred_json, gt_dir, image_ids=[kept["image_id"]])
    assert not caplog.records
    assert report["All"]["pq"] == pytest.approx(100.0)
    assert set(report["per_class"]) >= {s["category_id"] for s in kept["segments_info"]}
    asked = evaluate_panoptic(gt_json, gt_dir, pred_json, gt_dir, image_ids=[kept["image_id"], dropped["image_id"]])
    assert asked["All"]["pq"] == pytest.approx(evaluate_panoptic(gt_json, gt_dir, pred_json, gt_dir)["All"]["pq"])


def test_records_of_images_not_asked_for_are_not_read(coco_samples, tmp_path):
    """GT records prepare rejected (here: an image annotated twice) belong to images the
    evaluation does not score; they must not stop it after the whole inference."""
    gt_json, gt_dir = coco_samples / "panoptic_val2017.json", coco_samples / "panoptic_val2017"
    data = json.loads(gt_json.read_text())
    kept, dropped = data["annotations"]
    data["annotations"].append(dropped)  # image `dropped` annotated twice
    broken = tmp_path / "gt.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="appears twice"):
        evaluate_panoptic(broken, gt_dir, gt_json, gt_dir)
    report = evaluate_panoptic(broken, gt_dir, gt_json, gt_dir, image_ids=[kept["image_id"]])
    assert report["All"]["pq"] == pytest.approx(100.0)


def test_cli_panoptic_prints_documented_keys(coco_samples, tmp_path):
    gt_json, gt_dir = coco_samples / "panoptic_val2017.json", coco_samples / "panoptic_val2017"
    output = tmp_path / "out" / "pq.json"
    args = ["--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", gt_json, "--pred-dir", gt_dir,
            "--unseen", "cow,giraffe,tree,sky,grass", "--output", output]
    done = run_cli("panoptic", *args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == set(GROUPS) | {"HM", "per_class"}
    for group in GROUPS:
        assert set(report[group]) == {"pq", "sq", "rq", "n"}
    assert set(report["HM"]) == {"pq", "sq", "rq"}
    assert report["Unseen"]["n"] >= 2 and report["Unseen"]["pq"] == pytest.approx(100.0)
    assert all(set(v) == {"pq", "sq", "rq"} and k.isdigit() for k, v in report["per_class"].items())
    assert json.loads(output.read_text()) == report


def run_cli(*args):
    command = [sys.executable, "-m", "pading.cli", "evaluate", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------- panoptic bad input
def write_panoptic_png(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def tiny_panoptic(tmp_path):
    """A 1-image GT in COCO panoptic files; returns (gt_json, gt_dir, pred_dir)."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_panoptic_png(gt_dir / "1.png", np.array([[300, 300], [70000, 0]]))
    gt = {"categories": CATEGORIES, "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": [
        {"id": 300, "category_id": PERSON, "iscrowd": 0}, {"id": 70000, "category_id": SKY, "iscrowd": 0}]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json", gt_dir, pred_dir


def test_panoptic_files_round_trip_rgb_ids(tiny_panoptic, tmp_path):
    gt_json, gt_dir, pred_dir = tiny_panoptic
    write_panoptic_png(pred_dir / "p1.png", np.array([[300, 300], [0, 0]]))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "file_name": "p1.png", "segments_info": [{"id": 300, "category_id": PERSON}]}]}))
    report = evaluate_panoptic(gt_json, gt_dir, tmp_path / "pred.json", pred_dir)
    assert report["per_class"] == {PERSON: {"pq": 100.0, "sq": 100.0, "rq": 100.0}, SKY: {"pq": 0.0, "sq": 0.0, "rq": 0.0}}


def test_panoptic_bad_prediction_files_name_the_problem(tiny_panoptic, tmp_path):
    gt_json, gt_dir, pred_dir = tiny_panoptic
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"predictions": []}))
    with pytest.raises(AnnotationError, match="'annotations'") as err:
        evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir)
    assert "pred.json" in err.value.source

    pred_json.write_text(json.dumps({"annotations": [
        {"image_id": 1, "file_name": "p1.png", "segments_info": [{"id": 300, "category_id": PERSON}]}]}))
    with pytest.raises(DataError, match="does not exist") as err:  # PNG not written yet
        evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir)
    assert "p1.png" in err.value.source

    write_panoptic_png(pred_dir / "p1.png", np.array([[300, 300], [70000, 0]]))
    with pytest.raises(AnnotationError, match="segment id 70000 is in the PNG but not in segments_info") as err:
        evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir)
    assert "p1.png" in err.value.source

    pred_json.write_text(json.dumps({"annotations": [{"image_id": 1, "file_name": "p1.png", "segments_info": [
        {"id": 300, "category_id": PERSON}, {"id": 70000}]}]}))
    with pytest.raises(AnnotationError, match="'category_id'") as err:
        evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir)
    assert "annotations[0].segments_info[1]" in err.value.source


def test_cli_unknown_unseen_name_exits_2_naming_it(tiny_panoptic):
    gt_json, gt_dir, _ = tiny_panoptic
    done = run_cli("panoptic", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", gt_json,
                   "--pred-dir", gt_dir, "--unseen", "cow,unicorn")
    assert done.returncode == 2
    assert "unicorn" in done.stderr and done.stdout == ""


# ------------------------------------------------------------------------------ instance
def mask_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def box_mask(top, left, size, shape=(20, 20)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[top : top + size, left : left + size] = 1
    return mask


@pytest.fixture
def instance_gt():
    """2 images, person (seen) x2, cow (unseen) x1, dog (seen) x1; categories 1, 2, 3."""
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "cow"}, {"id": 3, "name": "dog"}, {"id": 4, "name": "cat"}]
    placed = [(1, 1, box_mask(0, 0, 8)), (1, 2, box_mask(10, 10, 8)), (2, 1, box_mask(2, 2, 10)), (2, 3, box_mask(12, 0, 6))]
    annotations = [
        {"id": k + 1, "image_id": image_id, "category_id": category_id, "segmentation": mask_rle(mask),
         "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
        for k, (image_id, category_id, mask) in enumerate(placed)
    ]
    images = [{"id": i, "height": 20, "width": 20, "file_name": f"{i}.jpg"} for i in (1, 2)]
    return {"images": images, "annotations": annotations, "categories": cats}


def perfect_results(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 0.9}
            for a in gt["annotations"]]


def test_instance_perfect_results_score_100(instance_gt):
    report = evaluate_instance(instance_gt, perfect_results(instance_gt), unseen_ids={2})
    for group in ("All", "Seen", "Unseen"):
        assert report[group]["map50"] == pytest.approx(100.0)
        assert report[group]["recall100"] == pytest.approx(100.0)
    assert (report["All"]["n"], report["Seen"]["n"], report["Unseen"]["n"]) == (3, 2, 1)  # cat has no GT
    assert report["HM"] == pytest.approx({"map50": 100.0, "recall100": 100.0})
    assert set(report["per_class"]) == {1, 2, 3}


def test_instance_wrong_class_scores_zero_for_that_class(instance_gt):
    results = perfect_results(instance_gt)
    dog = next(r for r in results if r["category_id"] == 3)
    dog.update(category_id=1, score=0.5)  # the dog predicted as a person, ranked after the real persons
    report = evaluate_instance(instance_gt, results, unseen_ids={2})
    assert report["per_class"][3] == {"map50": 0.0, "recall100": 0.0}
    assert report["per_class"][1]["map50"] == pytest.approx(100.0)
    assert report["Seen"]["map50"] == pytest.approx(50.0)
    assert report["HM"]["map50"] == pytest.approx(2 * 50 * 100 / 150)


def test_instance_empty_results_are_all_zero(instance_gt, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("[]")
    report = evaluate_instance(instance_gt, path, unseen_ids={2})
    assert report["All"] == {"map50": 0.0, "recall100": 0.0, "n": 3}
    assert report["HM"] == {"map50": 0.0, "recall100": 0.0}


def test_instance_scores_only_the_images_asked_for(instance_gt):
    results = [r for r in perfect_results(instance_gt) if r["image_id"] == 1]  # image 2 was not predicted
    report = evaluate_instance(instance_gt, results, unseen_ids={2}, image_ids=[1])
    assert report["All"]["map50"] == pytest.approx(100.0) and set(report["per_class"]) == {1, 2}
    missed = evaluate_instance(instance_gt, results, unseen_ids={2})  # all of the GT: image 2's objects missed
    assert missed["per_class"][3] == {"map50": 0.0, "recall100": 0.0}
    empty = evaluate_instance(instance_gt, [], unseen_ids={2}, image_ids=[1])
    assert empty["All"]["n"] == 2  # classes with GT in the images asked for


def test_instance_gt_of_images_not_asked_for_is_not_indexed(instance_gt):
    gt = {**instance_gt, "images": instance_gt["images"] + [{"id": 3, "height": 20, "width": 20, "file_name": "3.jpg"}],
          "annotations": instance_gt["annotations"] + [{"id": 99, "image_id": 3, "category_id": 1, "iscrowd": 0,
                                                        "segmentation": "not a polygon", "area": 1, "bbox": [0, 0, 1, 1]}]}
    report = evaluate_instance(gt, perfect_results(instance_gt), unseen_ids={2}, image_ids=[1, 2])
    assert report["All"]["map50"] == pytest.approx(100.0)


def test_instance_bad_results_name_the_record(instance_gt):
    results = perfect_results(instance_gt)
    del results[1]["score"]
    with pytest.raises(AnnotationError, match="'score'") as err:
        evaluate_instance(instance_gt, results)
    assert err.value.source == "results[1]"


def test_instance_perfect_on_real_coco_tiny_via_cli(coco_tiny, tmp_path):
    from pycocotools.coco import COCO

    gt_json = coco_tiny / "annotations" / "instances_val2017.json"
    coco = COCO(str(gt_json))
    results = []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"]:
            continue
        rle = coco.annToRLE(a)
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                        "segmentation": {"size": rle["size"], "counts": counts}})
    pred_json = tmp_path / "results.json"
    pred_json.write_text(json.dumps(results))
    done = run_cli("instance", "--gt-json", gt_json, "--pred-json", pred_json, "--unseen", "cow,giraffe,dog")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["All"]["n"] > 10
    for group in ("All", "Seen", "Unseen"):
        assert report[group]["map50"] == pytest.approx(100.0)
        assert report[group]["recall100"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------ semantic
SEMANTIC_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "cow"}, {"id": 3, "name": "dog"},
                       {"id": 5, "name": "tree-merged"}]
SEMANTIC_GT = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], dtype=np.uint8)
SEMANTIC_PRED = np.array([[0, 1, 1, 1], [2, 7, 0, 0]], dtype=np.uint8)  # 7 = category 8: not known -> wrong


def test_semantic_hand_confusion():
    evaluator = SemanticEvaluator(SEMANTIC_CATEGORIES, unseen_ids={2})
    evaluator.add(SEMANTIC_GT, SEMANTIC_PRED)
    report = evaluator.summarize()
    # person: 1 / (2 + 1 - 1); cow: 2 / (2 + 3 - 2); dog: 1 / (2 + 1 - 1); tree absent. Ignored pixels skipped.
    assert {k: v["miou"] for k, v in report["per_class"].items()} == pytest.approx({1: 50.0, 2: 200 / 3, 3: 50.0})
    assert report["All"]["n"] == 3 and report["All"]["miou"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert report["Seen"] == pytest.approx({"miou": 50.0, "n": 2})
    assert report["HM"]["miou"] == pytest.approx(2 * 50 * (200 / 3) / (50 + 200 / 3))


def test_semantic_merge_and_unknown_gt_label():
    parts = [SemanticEvaluator(SEMANTIC_CATEGORIES) for _ in range(2)]
    parts[0].add(SEMANTIC_GT[:1], SEMANTIC_PRED[:1])
    parts[1].add(SEMANTIC_GT[1:], SEMANTIC_PRED[1:])
    single = SemanticEvaluator(SEMANTIC_CATEGORIES)
    single.add(SEMANTIC_GT, SEMANTIC_PRED)
    assert pickle.loads(pickle.dumps(parts[0])).merge(parts[1]).summarize() == single.summarize()
    with pytest.raises(AnnotationError, match="GT label 3"):  # category 4 is not in the list
        single.add(np.array([[3]]), np.array([[3]]))


def test_semantic_files_and_cli(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    Image.fromarray(SEMANTIC_GT).save(gt_dir / "a.png")
    Image.fromarray(SEMANTIC_PRED).save(pred_dir / "a.png")
    report = evaluate_semantic(gt_dir, pred_dir, categories=SEMANTIC_CATEGORIES)
    assert report["All"]["miou"] == pytest.approx((50 + 200 / 3 + 50) / 3)

    categories_json = tmp_path / "cats.json"
    categories_json.write_text(json.dumps({"categories": SEMANTIC_CATEGORIES}))
    done = run_cli("semantic", "--gt-dir", gt_dir, "--pred-dir", pred_dir, "--categories", categories_json,
                   "--unseen", "cow")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Unseen"] == pytest.approx({"miou": 200 / 3, "n": 1})

    Image.fromarray(SEMANTIC_GT).save(gt_dir / "b.png")
    with pytest.raises(AnnotationError, match="b.png") as err:
        evaluate_semantic(gt_dir, pred_dir, categories=SEMANTIC_CATEGORIES)
    assert err.value.source.endswith("b.png")
    # the images asked for: b.png not among them is not scored; asked for and failed, it is all missed
    only_a = evaluate_semantic(gt_dir, pred_dir, categories=SEMANTIC_CATEGORIES, names=["a.png"])
    assert only_a["All"]["miou"] == pytest.approx(report["All"]["miou"])
    with_b = evaluate_semantic(gt_dir, pred_dir, categories=SEMANTIC_CATEGORIES, names=["a.png", "b.png"])
    missed = SemanticEvaluator(SEMANTIC_CATEGORIES)
    missed.add(SEMANTIC_GT, SEMANTIC_PRED)
    missed.add(SEMANTIC_GT, np.full_like(SEMANTIC_GT, 255))
    assert with_b["All"]["miou"] == pytest.approx(missed.summarize()["All"]["miou"])
    assert with_b["All"]["miou"] < only_a["All"]["miou"]


def test_semantic_default_categories_are_cocostuff(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    labels = np.array([[0, 181, 255]], dtype=np.uint8)  # person (1), wood (182), ignore
    Image.fromarray(labels).save(gt_dir / "a.png")
    Image.fromarray(labels).save(pred_dir / "a.png")
    report = evaluate_semantic(gt_dir, pred_dir)
    assert report["per_class"] == {1: {"miou": 100.0}, 182: {"miou": 100.0}}


@pytest.mark.parametrize("kept", [1, 2, 7, 40])
def test_the_panoptic_merge_owner_is_the_first_argmax(kept):
    """The merge's running maximum picks, per pixel, the same query as ``argmax(0)`` of the
    score-weighted masks, ties included (coarse values make many: the first query wins)."""
    import torch

    from pading.evaluation.inference import _first_argmax

    generator = torch.Generator().manual_seed(kept)
    scores = torch.randint(1, 4, (kept,), generator=generator).float() / 4
    masks = torch.randint(0, 5, (kept, 37, 53), generator=generator).float() / 4  # many exact ties
    expected = (scores[:, None, None] * masks).argmax(0)
    assert torch.equal(_first_argmax(scores, masks), expected)
    masks = torch.rand(kept, 37, 53, generator=generator)
    assert torch.equal(_first_argmax(scores, masks), (scores[:, None, None] * masks).argmax(0))
