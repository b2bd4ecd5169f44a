import pickle

import pytest

from pading.classes import (
    ClassInfo,
    ClassTable,
    clean_name,
    coco_instance_categories,
    coco_panoptic_categories,
    cocostuff_categories,
    zero_shot_split,
)
from pading.errors import UnknownClassError


def test_package_category_lists():
    pan = coco_panoptic_categories()
    assert len(pan) == 133 and sum(c["isthing"] for c in pan) == 80
    assert len(coco_instance_categories()) == 80
    stuff = cocostuff_categories()
    assert len(stuff) == 171 and max(c["id"] for c in stuff) == 182


@pytest.mark.parametrize(
    "raw,clean",
    [("tree-merged", "tree"), ("sky-other-merged", "sky"), ("door-stuff", "door"), ("wall-brick", "wall brick"),
     ("traffic light", "traffic light"), ("playingfield", "playingfield")],
)
def test_clean_name(raw, clean):
    assert clean_name(raw) == clean


@pytest.mark.parametrize(
    "split,num_classes,num_unseen",
    [("zsp_coco_panoptic_14", 133, 14), ("zsi_coco_48_17", 65, 17), ("zsi_coco_65_15", 80, 15),
     ("zss_cocostuff_171_15", 171, 15)],
)
def test_split_tables(split, num_classes, num_unseen):
    table = ClassTable.from_split(split)
    assert table.num_classes == num_classes
    assert len(table.unseen_indices) == num_unseen
    assert table.no_object_index == num_classes
    assert set(table.unseen_indices).isdisjoint(table.seen_indices)


def test_lookups_and_errors():
    table = ClassTable.from_split("zsp_coco_panoptic_14")
    i = table.index_of_name("tree-merged")
    assert table.index_of_name("tree") == i and table[i].unseen and not table[i].isthing
    assert table.index_of_id(table[i].id) == i
    with pytest.raises(UnknownClassError, match="unicorn"):
        table.index_of_name("unicorn")
    with pytest.raises(UnknownClassError, match="category id 999"):
        table.index_of_id(999)
    with pytest.raises(UnknownClassError):
        zero_shot_split("no-such-split")


def test_records_roundtrip_pickle_and_runtime_classes():
    table = ClassTable.from_split("zsi_coco_48_17")
    again = ClassTable.from_records(table.to_records())
    assert again == table
    assert pickle.loads(pickle.dumps(table)) == table
    bigger = table.with_classes([ClassInfo(id=10_000, name="pangolin", isthing=True, unseen=True, added=True)])
    assert bigger.num_classes == table.num_classes + 1 and bigger.index_of_name("pangolin") == table.num_classes
    assert bigger.without("pangolin") == table
    with pytest.raises(ValueError, match="duplicate"):
        table.with_classes([ClassInfo(id=10_001, name="person", isthing=True)])
