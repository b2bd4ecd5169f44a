import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pading.classes import ClassTable
from pading.config import InferenceConfig
from pading.errors import ConfigError, DataError
from pading.evaluation.inference import (
    MASK_SCORE_EPS,
    instance_inference,
    instances_to_coco_results,
    panoptic_inference,
    panoptic_to_rgb,
    rgb_to_ids,
    semantic_inference,
    semantic_to_label_map,
)
from pading.model.segmenter import OriginalSizeMaskLogits, postprocess_mask_logits

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


def _low_res_cases(count: int, seed: int = 0):
    """Random (Q, s, s) low-resolution mask logits and the meta of an image they map back to."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high, (), generator=generator))

    for _ in range(count):
        queries, side = draw(2, 40), draw(4, 40)
        size = 4 * side
        meta = {"input_size": size, "resized_size": (draw(1, size + 1), draw(1, size + 1)),
                "original_size": (draw(1, 700), draw(1, 700))}
        yield torch.randn(queries, side, side, generator=generator) * 4, meta, generator


@pytest.mark.parametrize("threads", [1, 2])
def test_a_querys_resized_logits_do_not_depend_on_the_others_resized_with_it(threads):
    """Resized as channels of one image, a subset's values differed from the whole set's in the
    last bit for about a third of these shapes; each map resized on its own, they are equal."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for low, meta, generator in _low_res_cases(40):
            every = postprocess_mask_logits(low, meta)
            assert every.shape == (low.shape[0], *meta["original_size"])
            some = torch.randperm(low.shape[0], generator=generator)[: max(1, low.shape[0] // 3)]
            lazy = OriginalSizeMaskLogits(low, meta)
            assert torch.equal(lazy.rows(some), every[some])
            assert torch.equal(lazy.rows(), every) and torch.equal(lazy.rows(some), every[some])
    finally:
        torch.set_num_threads(previous)


class _CountingLogits(OriginalSizeMaskLogits):
    """Records how many queries each :meth:`rows` call resized to the original size."""

    def __init__(self, low, meta):
        super().__init__(low, meta)
        self.resized = []

    def rows(self, index=None):
        if self._all is None:
            self.resized.append(self.shape[0] if index is None or index.numel() >= self.shape[0] else index.numel())
        return super().rows(index)


def test_post_processing_from_low_resolution_equals_it_from_the_resized_logits(table):
    """Every task gives what it gives on the fully resized (Q, H, W) logits, and the panoptic
    merge resizes only the queries it keeps."""
    classes_generator = torch.Generator().manual_seed(1)
    for low, meta, _ in _low_res_cases(12, seed=3):
        class_logits = torch.randn(low.shape[0], NO_OBJECT + 1, generator=classes_generator) * 3
        every = postprocess_mask_logits(low, meta)
        lazy = _CountingLogits(low, meta)
        ids, segments = panoptic_inference(lazy, class_logits, table=table)
        expected_ids, expected_segments = panoptic_inference(every, class_logits, table=table)
        assert np.array_equal(ids, expected_ids) and segments == expected_segments
        scores, labels = class_logits.softmax(-1).max(-1)
        kept = int(((labels != NO_OBJECT) & (scores > InferenceConfig().object_mask_threshold)).sum())
        assert lazy.resized == [kept]
        got, expected = instance_inference(lazy, class_logits, table=table), instance_inference(every, class_logits,
                                                                                                  table=table)
        assert [(i["category_id"], i["query"], i["score"]) for i in got] == [
            (i["category_id"], i["query"], i["score"]) for i in expected]
        assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(got, expected))
        assert np.array_equal(semantic_inference(lazy, class_logits, table=table),
                              semantic_inference(every, class_logits, table=table))


def test_instances_of_one_query_share_its_mask_and_score_as_each_pair_alone(table):
    """Each (query, class) pair's score is p_q[c] x the mean of m_q inside its mask, as computed
    pair by pair; the pairs of a query share one mask array and one encoded RLE."""
    generator = torch.Generator().manual_seed(5)
    mask_logits = torch.randn(6, 20, 30, generator=generator) * 3
    class_logits = torch.randn(6, NO_OBJECT + 1, generator=generator)
    instances = instance_inference(mask_logits, class_logits, table=table)
    assert len(instances) == 6 * 2
    probs = class_logits.softmax(-1)
    for instance in instances:
        query_probs = mask_logits[instance["query"]].double().sigmoid()
        inside = query_probs > 0.5
        mean = float((query_probs * inside).sum() / (inside.sum() + MASK_SCORE_EPS))
        assert instance["score"] == pytest.approx(float(probs[instance["query"], instance["class_index"]]) * mean,
                                                  rel=1e-6)
        assert np.array_equal(instance["mask"], inside.numpy())
    by_query = {}
    for instance, result in zip(instances, instances_to_coco_results(instances, image_id=7)):
        by_query.setdefault(instance["query"], []).append(result)
        assert result["category_id"] == table[instance["class_index"]].id
    assert len(by_query) == 6
    for results in by_query.values():
        assert all(r["segmentation"] == results[0]["segmentation"] and r["bbox"] == results[0]["bbox"]
                   for r in results)


@pytest.mark.parametrize("ties", [True, False])
def test_semantic_labels_are_the_dense_argmax_ties_included(table, ties):
    """The semantic answer's running maximum over classes gives ``argmax(0)`` of the (C, H, W)
    score volume: repeated class logits make exact ties, which the first class wins."""
    generator = torch.Generator().manual_seed(int(ties))
    class_logits = torch.randn(6, NO_OBJECT + 1, generator=generator)
    if ties:
        class_logits[:, CAR] = class_logits[:, PERSON]
        class_logits[:, SKY] = class_logits[:, GRASS]
    mask_logits = torch.randn(6, 33, 47, generator=generator) * 2
    volume = torch.einsum("qc,qhw->chw", class_logits.softmax(-1)[:, :-1], mask_logits.sigmoid())
    labels = semantic_inference(mask_logits, class_logits, table=table)
    assert np.array_equal(labels, volume.argmax(0).numpy())
    assert not ties or not np.isin(labels, [CAR, SKY]).any()



def _panoptic_one_query_at_a_time(mask_probs, class_logits, table, config):
    """The merge as Mask2Former writes it, one kept query at a time (the reference for the
    counted-at-once version): argmax owner, own mask, areas and ids per query. Also returns
    how many queries were dropped by the area rules and how many merged into a stuff segment."""
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = (labels != table.no_object_index) & (scores > config.object_mask_threshold)
    kept_scores, kept_labels, kept_masks = scores[keep], labels[keep], mask_probs[keep]
    segment_ids = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32)
    segments, stuff, dropped, merged = [], {}, 0, 0
    if kept_masks.shape[0] == 0:
        return segment_ids.numpy(), segments, dropped, merged
    owner = (kept_scores[:, None, None] * kept_masks).argmax(0)
    for k in range(kept_masks.shape[0]):
        class_index = int(kept_labels[k])
        isthing = bool(table[class_index].isthing)
        own, won = kept_masks[k] >= config.mask_threshold, owner == k
        mask = won & own
        won_area, own_area, area = int(won.sum()), int(own.sum()), int(mask.sum())
        if won_area == 0 or own_area == 0 or area == 0 or won_area / own_area < config.overlap_threshold:
            dropped += 1
            continue
        score = float(kept_scores[k])
        if not isthing and class_index in stuff:
            segment_ids[mask] = stuff[class_index]["id"]
            stuff[class_index]["area"] += area
            stuff[class_index]["score"] = max(stuff[class_index]["score"], score)
            merged += 1
            continue
        segment = {"id": len(segments) + 1, "category_id": int(table[class_index].id), "class_index": class_index,
                   "isthing": isthing, "score": score, "area": area}
        segment_ids[mask] = segment["id"]
        segments.append(segment)
        if not isthing:
            stuff[class_index] = segment
    return segment_ids.numpy(), segments, dropped, merged


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.8])
def test_the_panoptic_merge_equals_it_one_query_at_a_time(table, overlap):
    """Areas counted for every kept query at once give the reference's ids and segments, with
    coarse mask values (many exact ties), queries dropped by the area rules and stuff queries
    of one class merged."""
    config = InferenceConfig(object_mask_threshold=0.3, overlap_threshold=overlap)
    generator = torch.Generator().manual_seed(int(overlap * 10))
    dropped = merged = 0
    for _ in range(30):
        queries = int(torch.randint(1, 12, (), generator=generator))
        class_logits = torch.randn(queries, NO_OBJECT + 1, generator=generator) * 4
        coarse = torch.randint(0, 5, (queries, 23, 31), generator=generator).float() / 4
        mask_logits = torch.logit(coarse.clamp(1e-4, 1 - 1e-4))
        ids, segments = panoptic_inference(mask_logits, class_logits, table=table, config=config)
        expected_ids, expected_segments, was_dropped, was_merged = _panoptic_one_query_at_a_time(
            mask_logits.sigmoid(), class_logits, table, config)
        assert np.array_equal(ids, expected_ids) and segments == expected_segments
        dropped, merged = dropped + was_dropped, merged + was_merged
    assert dropped > 0 and (merged > 0 or overlap > 0)  # with random masks, merges survive the lenient rule only
