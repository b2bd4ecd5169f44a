import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pading.classes import ClassTable
from pading.config import InferenceConfig
from pading.errors import ConfigError, DataError
from pading.evaluation.inference import (
    instance_inference,
    instances_to_coco_results,
    panoptic_inference,
    panoptic_to_rgb,
    rgb_to_ids,
    semantic_inference,
    semantic_to_label_map,
)

CONFIDENT = 10.0
H, W = 4, 8
PERSON, CAR, GRASS, SKY = 0, 1, 2, 3  # class indices in TABLE order
NO_OBJECT = 4


@pytest.fixture(scope="module")
def table():
    return ClassTable.from_categories(
        [
            {"id": 1, "name": "person", "isthing": 1},
            {"id": 3, "name": "car", "isthing": 1},
            {"id": 149, "name": "grass-merged", "isthing": 0},
            {"id": 184, "name": "sky-other-merged", "isthing": 0},
        ]
    )


def _left():
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, : W // 2] = True
    return mask


def _mask_logits(*masks):
    """(Q, H, W) logits: +CONFIDENT inside each boolean mask, -CONFIDENT outside."""
    return torch.stack([torch.where(m, CONFIDENT, -CONFIDENT) for m in masks])


def _class_logits(*rows):
    """(Q, 5) logits: each row a dict {class index: logit}, others 0."""
    logits = torch.zeros(len(rows), NO_OBJECT + 1)
    for q, row in enumerate(rows):
        for c, value in row.items():
            logits[q, c] = value
    return logits


def _scene():
    """q0: person (thing) left, q1: grass (stuff) right, q2: no object everywhere,
    q3: a low-score car on the right."""
    left = _left()
    everywhere = torch.ones(H, W, dtype=torch.bool)
    masks = _mask_logits(left, ~left, everywhere, ~left)
    classes = _class_logits({PERSON: CONFIDENT}, {GRASS: CONFIDENT}, {NO_OBJECT: CONFIDENT}, {CAR: 1.0})
    return masks, classes


def test_panoptic_two_segments_and_dropped_queries(table):
    masks, classes = _scene()
    ids, segments = panoptic_inference(masks, classes, table=table)
    assert ids.dtype == np.int32 and ids.shape == (H, W)
    assert [(s["id"], s["category_id"], s["class_index"], s["isthing"], s["area"]) for s in segments] == [
        (1, 1, PERSON, True, 16),
        (2, 149, GRASS, False, 16),
    ]
    assert (ids[:, : W // 2] == 1).all() and (ids[:, W // 2 :] == 2).all()
    expected_score = float(torch.softmax(classes[0], -1)[PERSON])
    assert segments[0]["score"] == pytest.approx(expected_score)


def test_low_score_query_is_dropped_unless_threshold_allows(table):
    masks, classes = _scene()
    masks, classes = masks[[0, 3]], classes[[0, 3]]  # person left + weak car right
    _, segments = panoptic_inference(masks, classes, table=table)
    assert [s["category_id"] for s in segments] == [1]
    car_prob = float(torch.softmax(classes[1], -1)[CAR])
    lenient = InferenceConfig(object_mask_threshold=car_prob - 0.01)
    _, segments = panoptic_inference(masks, classes, table=table, config=lenient)
    assert [s["category_id"] for s in segments] == [1, 3]


def test_stuff_queries_of_one_class_merge_things_do_not(table):
    left = _left()
    masks = _mask_logits(left, ~left)
    _, stuff = panoptic_inference(masks, _class_logits({SKY: CONFIDENT}, {SKY: CONFIDENT}), table=table)
    assert len(stuff) == 1 and stuff[0]["area"] == H * W and stuff[0]["category_id"] == 184
    ids, things = panoptic_inference(masks, _class_logits({CAR: CONFIDENT}, {CAR: CONFIDENT}), table=table)
    assert [s["area"] for s in things] == [16, 16] and set(np.unique(ids)) == {1, 2}


def test_overlap_threshold_drops_a_mostly_hidden_segment(table):
    left = _left()
    masks = _mask_logits(left, torch.ones(H, W, dtype=torch.bool))
    classes = _class_logits({PERSON: CONFIDENT + 2}, {CAR: CONFIDENT})  # person scores higher on the left
    ids, segments = panoptic_inference(masks, classes, table=table)
    # the car keeps only the right half: 16 / 32 < overlap_threshold 0.8 -> dropped, right half void
    assert [s["category_id"] for s in segments] == [1]
    assert (ids[:, W // 2 :] == 0).all()
    _, kept = panoptic_inference(masks, classes, table=table, config=InferenceConfig(overlap_threshold=0.4))
    assert [s["category_id"] for s in kept] == [1, 3]


def test_instance_inference_things_only_sorted(table):
    masks, classes = _scene()
    instances = instance_inference(masks, classes, table=table)
    assert len(instances) == 4 * 2  # Q queries x 2 thing classes (top-k = 100)
    assert {i["category_id"] for i in instances} == {1, 3}
    scores = [i["score"] for i in instances]
    assert scores == sorted(scores, reverse=True)
    best = instances[0]
    assert best["category_id"] == 1 and best["class_index"] == PERSON
    assert best["mask"].dtype == bool and np.array_equal(best["mask"], _left().numpy())
    mean_inside = float(torch.sigmoid(torch.tensor(CONFIDENT)))
    assert best["score"] == pytest.approx(float(torch.softmax(classes[0], -1)[PERSON]) * mean_inside)
    top2 = instance_inference(masks, classes, table=table, config=InferenceConfig(instance_top_k=2))
    assert [i["score"] for i in top2] == pytest.approx(scores[:2])


def test_instances_to_coco_results(table):
    masks, classes = _scene()
    instances = instance_inference(masks, classes, table=table, config=InferenceConfig(instance_top_k=1))
    (result,) = instances_to_coco_results(instances, image_id=42)
    assert result["image_id"] == 42 and result["category_id"] == 1
    assert isinstance(result["segmentation"]["counts"], str)
    assert result["bbox"] == [0.0, 0.0, 4.0, 4.0]
    rle = dict(result["segmentation"], counts=result["segmentation"]["counts"].encode())
    assert np.array_equal(mask_utils.decode(rle).astype(bool), _left().numpy())


def test_semantic_inference_halves_and_label_map(table):
    masks, classes = _scene()
    index_map = semantic_inference(masks, classes, table=table)
    assert index_map.dtype == np.int64
    expected = np.where(_left().numpy(), PERSON, GRASS)
    assert np.array_equal(index_map, expected)
    labels = semantic_to_label_map(index_map, table)
    assert labels.dtype == np.uint8
    assert (labels[:, : W // 2] == 0).all() and (labels[:, W // 2 :] == 148).all()
    index_map[0, 0] = -1
    assert semantic_to_label_map(index_map, table)[0, 0] == 255


def test_table_with_more_classes_than_the_logits_is_an_error(table):
    masks, classes = _scene()
    with pytest.raises(ConfigError, match="class table"):
        semantic_inference(masks, classes[:, 1:], table=table)
    with pytest.raises(DataError):
        panoptic_inference(masks[0], classes, table=table)


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [257, 65536 + 3, 5_000_000, 256**3 - 1]], dtype=np.int32)
    rgb = panoptic_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 0].tolist() == [1, 1, 0]  # 257 = 1 + 256
    assert np.array_equal(rgb_to_ids(rgb), ids)
    with pytest.raises(DataError):
        panoptic_to_rgb(np.array([[256**3]]))



@pytest.mark.parametrize("peaked", [True, False])
def test_semantic_large_vocabulary_equals_the_dense_argmax(peaked):
    """Above SEMANTIC_DENSE_CLASSES the labels come from candidate classes plus an exact
    fallback; they must equal the dense (C, H, W) argmax, pixel for pixel."""
    from pading.evaluation.inference import _semantic_large_vocabulary

    generator = torch.Generator().manual_seed(0)
    queries, classes = 20, 1500
    logits = torch.randn(queries, classes, generator=generator) * (8.0 if peaked else 0.5)
    probs = logits.softmax(-1)
    mask_probs = torch.rand(queries, 24, 32, generator=generator)
    dense = torch.einsum("qc,qhw->chw", probs, mask_probs).argmax(0)
    fast = _semantic_large_vocabulary(probs, mask_probs)
    assert fast.shape == (24, 32) and torch.equal(fast, dense)
