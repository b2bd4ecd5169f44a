"""COCO readers on real files (coco-samples panoptic, coco-tiny instances) and bad input."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pading.classes import ClassTable, cocostuff_categories
from pading.data import (
    ImageRecord,
    Reject,
    has_unseen,
    load_image,
    load_instance_targets,
    load_panoptic_targets,
    load_semantic_targets,
    mask_bbox,
    mask_to_rle,
    panoptic_to_instances,
    panoptic_to_semantic,
    read_instances_index,
    read_panoptic_index,
    read_panoptic_png,
    read_semantic_index,
    seen_only_filter,
)
from pading.data.targets import decode_segmentation
from pading.errors import AnnotationError, CorruptImageError


@pytest.fixture(scope="module")
def panoptic(coco_samples):
    json_path = coco_samples / "panoptic_val2017.json"
    records, categories, rejects = read_panoptic_index(
        json_path, coco_samples / "val2017", coco_samples / "panoptic_val2017", "val"
    )
    return json.loads(json_path.read_text()), records, categories, rejects


@pytest.fixture(scope="module")
def zsp_table():
    return ClassTable.from_split("zsp_coco_panoptic_14")


# ---- panoptic (real) -----------------------------------------------------------------
def test_panoptic_index_matches_json(panoptic):
    data, records, categories, rejects = panoptic
    assert rejects == []
    assert len(records) == 2 and len(categories) == 133
    by_image = {a["image_id"]: a for a in data["annotations"]}
    for record in records:
        ann = by_image[record.image_id]
        assert len(record.segments) == len(ann["segments_info"])
        assert [s.id for s in record.segments] == [s["id"] for s in ann["segments_info"]]
        assert record.panoptic_path.endswith(ann["file_name"])
        image = load_image(record.image_path)
        assert image.shape == (record.height, record.width, 3) and image.dtype == np.uint8


def test_panoptic_targets_areas_equal_json(panoptic, zsp_table):
    _, records, _, _ = panoptic
    for record in records:
        targets = load_panoptic_targets(record, zsp_table)
        assert targets.masks.shape == (len(record.segments), record.height, record.width)
        json_area = {s.id: s.area for s in record.segments}
        for mask, segment_id in zip(targets.masks, targets.segment_ids):
            assert int(mask.sum()) == json_area[int(segment_id)]
        assert targets.masks.sum(axis=0).max() == 1  # panoptic segments do not overlap
        expected = [zsp_table.index_of_id(s.category_id) for s in record.segments]
        assert targets.labels.tolist() == expected and targets.labels.dtype == np.int64
        assert targets.iscrowd.tolist() == [s.iscrowd for s in record.segments]
        assert targets.iscrowd.any()  # the first sample has a crowd of people
        assert len(targets.without_crowd()) == len(targets) - int(targets.iscrowd.sum())


def test_classes_outside_table_are_left_out(panoptic):
    _, records, _, _ = panoptic
    table = ClassTable.from_split("zsp_coco_panoptic_14").without("person")
    person_id = 1
    for record in records:
        targets = load_panoptic_targets(record, table)
        assert person_id not in targets.category_ids.tolist()
        assert len(targets) == sum(s.category_id != person_id for s in record.segments)


def test_derived_semantic_and_instances(panoptic, zsp_table):
    _, records, _, _ = panoptic
    for record in records:
        ids = read_panoptic_png(record.panoptic_path)
        assert ids.dtype == np.int32 and ids.shape == (record.height, record.width)
        semantic = panoptic_to_semantic(ids, record.segments, zsp_table)
        assert semantic.dtype == np.uint8
        area_by_label = Counter()
        for s in record.segments:
            area_by_label[s.category_id - 1] += s.area
        values, counts = np.unique(semantic, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            expected = int((ids == 0).sum()) if value == 255 else area_by_label[value]
            assert count == expected
        instances = panoptic_to_instances(ids, record.segments, zsp_table, image_id=record.image_id)
        things = [s for s in record.segments if zsp_table[zsp_table.index_of_id(s.category_id)].isthing]
        assert [i["id"] for i in instances] == [s.id for s in things]
        for instance, segment in zip(instances, things):
            rle = dict(instance["segmentation"], counts=instance["segmentation"]["counts"].encode())
            assert int(mask_utils.area(rle)) == segment.area == instance["area"]
            assert instance["image_id"] == record.image_id
            assert instance["bbox"] == [float(v) for v in segment.bbox]


def test_seen_only_filter_real(panoptic, zsp_table):
    _, records, _, _ = panoptic
    assert all(has_unseen(r, zsp_table) for r in records)
    kept, dropped = seen_only_filter(records, zsp_table)
    assert kept == [] and len(dropped) == 2
    kept, dropped = seen_only_filter(records, zsp_table.with_unseen([]))
    assert len(kept) == 2 and dropped == []


def test_record_row_roundtrip_and_arrow(panoptic, zsp_table):
    _, records, _, _ = panoptic
    rows = [r.to_row(zsp_table) for r in records]
    assert all(row["has_unseen"] for row in rows)
    table = pa.Table.from_pylist(rows)
    back = [ImageRecord.from_row(row) for row in table.to_pylist()]
    assert back == records


def test_rle_and_bbox_hand_computed():
    mask = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)  # column-major: 1 1 | 0 1 | 0 0
    uncompressed = mask_to_rle(mask, compressed=False)
    assert uncompressed == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    assert mask_to_rle(~mask, compressed=False)["counts"] == [2, 1, 1, 2]
    for rle in (uncompressed, mask_to_rle(mask)):
        assert (decode_segmentation(json.dumps(rle), 2, 3) == mask).all()
    assert mask_bbox(mask) == [0.0, 0.0, 2.0, 2.0]
    assert mask_bbox(np.zeros((2, 3), dtype=bool)) == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(AnnotationError, match="differs"):
        decode_segmentation(uncompressed, 3, 3, source="ann 7")


# ---- instances (real) -------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_index_and_targets(coco_tiny, split):
    json_path = coco_tiny / "annotations" / f"instances_{split}2017.json"
    data = json.loads(json_path.read_text())
    records, categories, rejects = read_instances_index(json_path, coco_tiny / f"{split}2017", split)
    assert rejects == [] and len(categories) == 80
    assert len(records) == len(data["images"])
    assert sum(len(r.segments) for r in records) == len(data["annotations"])
    table = ClassTable.from_split("zsi_coco_48_17", categories=categories)
    crowd_seen = 0
    for record in records:
        targets = load_instance_targets(record, table)
        in_table = [s for s in record.segments if table.has_id(s.category_id)]
        assert targets.masks.shape == (len(in_table), record.height, record.width)
        for mask, segment, crowd in zip(targets.masks, in_table, targets.iscrowd):
            if crowd:  # uncompressed RLE: foreground pixels = the runs at odd positions
                crowd_seen += 1
                counts = json.loads(segment.segmentation)["counts"]
                assert isinstance(counts, list) and int(mask.sum()) == sum(counts[1::2])
            else:  # polygons: rasterised area within a few percent of COCO's polygon area
                assert abs(int(mask.sum()) - segment.area) <= max(0.1 * segment.area, 20)
    assert crowd_seen > 0


def test_image_modes_become_rgb(coco_tiny, tmp_path):
    source = sorted((coco_tiny / "val2017").glob("*.jpg"))[0]
    rgb = Image.open(source).convert("RGB")
    for mode, suffix in (("L", ".jpg"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("P", ".png"), ("I;16", ".png")):
        path = tmp_path / f"image_{mode.replace(';', '')}{suffix}"
        if mode == "I;16":
            Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 256).save(path)
        else:
            rgb.convert(mode).save(path)
        image = load_image(path)
        assert image.shape == (rgb.height, rgb.width, 3) and image.dtype == np.uint8, mode
        if mode in ("L", "I;16"):
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
            assert image.max() > 200  # 16-bit values rescaled to 8 bits, not clipped to white


# ---- semantic label PNGs (hand-made) --------------------------------------------------------
def test_semantic_index_and_targets(tmp_path):
    image_dir, label_dir = tmp_path / "val2017", tmp_path / "stuffthingmaps" / "val2017"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    labels = np.full((4, 6), 255, dtype=np.uint8)
    labels[:2, :3] = 0  # person (id 1): 6 pixels, bbox [0, 0, 3, 2]
    labels[2:, 1:] = 148  # road (id 149): 10 pixels, bbox [1, 2, 5, 2]
    Image.fromarray(labels).save(label_dir / "000000000007.png")
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(image_dir / "000000000007.jpg")
    bad = labels.copy()
    bad[0, 0] = 250  # category 251 is not a COCO-Stuff class
    Image.fromarray(bad).save(label_dir / "000000000008.png")
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(image_dir / "000000000008.jpg")
    Image.fromarray(labels).save(label_dir / "000000000009.png")  # no image
    records, categories, rejects = read_semantic_index(image_dir, label_dir, "val")
    assert len(categories) == 171
    assert [r.image_id for r in records] == [7]
    assert sorted(r.key for r in rejects) == ["000000000008", "000000000009"]
    assert "category id 251" in next(r.reason for r in rejects if r.key.endswith("8"))
    segments = {s.category_id: s for s in records[0].segments}
    assert (segments[1].area, segments[1].bbox) == (6, [0.0, 0.0, 3.0, 2.0])
    assert (segments[149].area, segments[149].bbox) == (10, [1.0, 2.0, 5.0, 2.0])
    table = ClassTable.from_split("zss_cocostuff_171_15", categories=cocostuff_categories())
    targets = load_semantic_targets(records[0], table)
    assert targets.category_ids.tolist() == [1, 149]
    assert targets.labels.tolist() == [table.index_of_id(1), table.index_of_id(149)]
    assert (targets.masks[1] == (labels == 148)).all()
    assert has_unseen(records[0], table)  # road is unseen in ZSS


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "missing"])
def test_corrupt_image_raises_naming_file(coco_samples, tmp_path, kind):
    good = sorted((coco_samples / "val2017").glob("*.jpg"))[0].read_bytes()
    path = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(CorruptImageError) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.source == str(path)


def test_panoptic_png_with_foreign_id(panoptic, zsp_table, tmp_path):
    _, records, _, _ = panoptic
    record = records[0]
    colour = np.asarray(Image.open(record.panoptic_path).convert("RGB")).copy()
    colour[:5, :5] = [57, 48, 0]  # id 57 + 256 * 48 = 12345
    bad_png = tmp_path / "foreign.png"
    Image.fromarray(colour).save(bad_png)
    with pytest.raises(AnnotationError) as info:
        load_panoptic_targets(dataclasses.replace(record, panoptic_path=str(bad_png)), zsp_table)
    assert str(bad_png) in str(info.value) and "12345" in str(info.value)
    small_png = tmp_path / "small.png"
    Image.fromarray(colour[:100, :100]).save(small_png)
    with pytest.raises(AnnotationError, match="differs"):
        load_panoptic_targets(dataclasses.replace(record, panoptic_path=str(small_png)), zsp_table)


def test_bad_json_files(coco_samples, tmp_path):
    data = json.loads((coco_samples / "panoptic_val2017.json").read_text())
    missing = tmp_path / "missing_key.json"
    missing.write_text(json.dumps({k: v for k, v in data.items() if k != "annotations"}))
    with pytest.raises(AnnotationError) as info:
        read_panoptic_index(missing, tmp_path, tmp_path, "val")
    assert str(missing) in str(info.value) and "'annotations'" in str(info.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_instances_index(broken, tmp_path, "val")


def test_bad_panoptic_records_are_rejected(coco_samples, tmp_path):
    data = json.loads((coco_samples / "panoptic_val2017.json").read_text())
    first, second = data["annotations"]
    first["segments_info"][2]["category_id"] = 9999
    data["annotations"].append({"image_id": 5, "segments_info": []})  # no file_name
    data["annotations"].append({"image_id": 6, "file_name": "6.png", "segments_info": []})  # no image 6
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(data))
    records, _, rejects = read_panoptic_index(path, tmp_path, tmp_path, "val")
    assert [r.image_id for r in records] == [second["image_id"]]
    assert all(isinstance(r, Reject) and r.source == str(path) for r in rejects)
    reasons = {r.key: r.reason for r in rejects}
    assert "unknown category id 9999" in reasons[f"image_id={first['image_id']}"]
    assert "'file_name'" in reasons["annotations[2]"]
    assert "no matching entry in 'images'" in reasons["image_id=6"]


def test_bad_instance_annotation_rejects_it_and_its_image(coco_tiny, tmp_path):
    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    bad = data["annotations"][0]
    bad["category_id"] = 4242
    del data["annotations"][1]["segmentation"]
    bad_images = {bad["image_id"], data["annotations"][1]["image_id"]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    records, _, rejects = read_instances_index(path, tmp_path, "val")
    assert len(records) == len(data["images"]) - len(bad_images)
    reasons = {r.key: r.reason for r in rejects}
    assert "unknown category id 4242" in reasons[f"annotation id={bad['id']}"]
    assert "'segmentation'" in reasons[f"annotation id={data['annotations'][1]['id']}"]
    assert {f"image_id={i}" for i in bad_images} <= set(reasons)
