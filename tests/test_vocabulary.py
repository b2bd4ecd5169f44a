"""pading.vocabulary (extra unseen class names) and the generator stage's start-up checks
(pading.training.checks): bad vocabularies and settings are refused before any work, naming the setting."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pading.classes import ClassTable
from pading.config import tiny_config
from pading.errors import ConfigError
from pading.training.checks import check_chunk_size, check_features_cover
from pading.vocabulary import extend_with_unseen, imagenet21k_names, read_names


def test_imagenet21k_names_ship_offline_and_are_unique():
    names = imagenet21k_names()
    assert len(names) == 21843 and len(set(names)) == len(names)
    assert "person" in names and all(name.strip() for name in names)


def test_lvis_plus_imagenet21k_is_over_20000_classes_with_the_dataset_classes_first():
    lvis = ClassTable.from_split("ovis_lvis_v1_rare")
    table = extend_with_unseen(lvis, "imagenet21k")
    assert table.num_classes > 20000
    assert table.classes[: lvis.num_classes] == lvis.classes  # indices of the dataset's classes unchanged
    extra = table.classes[lvis.num_classes:]
    assert all(c.unseen and c.isthing and c.added for c in extra)
    assert min(c.id for c in extra) > max(lvis.ids)
    lvis_texts = {c.text.lower() for c in lvis}
    assert not any(c.text.lower() in lvis_texts for c in extra)  # names LVIS has are left out


def _names_file(tmp_path, text):
    path = tmp_path / "names.txt"
    path.write_text(text)
    return str(path)


def test_a_names_file_extends_the_table(tmp_path):
    table = ClassTable.from_categories([{"id": 1, "name": "dog"}, {"id": 5, "name": "cat"}], unseen=["cat"])
    extended = extend_with_unseen(table, _names_file(tmp_path, "# extra\ntraffic cone\n\nsnow plough\n"))
    assert extended.names == ["dog", "cat", "traffic cone", "snow plough"]
    assert extended.ids == [1, 5, 6, 7] and extended.unseen_indices == [1, 2, 3]


@pytest.mark.parametrize("text, reason", [
    ("traffic cone\ntraffic_cone\n", "line 2 repeats"),
    ("traffic cone\n__\n", "line 2 .* empty class name"),
    ("traffic cone\nDog\n", "'Dog' is already a class"),
    ("# nothing\n\n", "names no class"),
])
def test_bad_names_files_are_refused_naming_the_setting(tmp_path, text, reason):
    table = ClassTable.from_categories([{"id": 1, "name": "dog"}])
    with pytest.raises(ConfigError, match=f"vocabulary.extra_unseen.*{reason}"):
        extend_with_unseen(table, _names_file(tmp_path, text))


def test_an_unknown_source_is_refused():
    with pytest.raises(ConfigError, match="vocabulary.extra_unseen='wordnet99'.*neither a built-in"):
        read_names("wordnet99")


def test_a_chunk_size_that_cannot_fit_is_refused():
    config = tiny_config(losses={"chunk_size": 10**12})
    with pytest.raises(ConfigError, match=r"losses.chunk_size=1000000000000 does not fit"):
        check_chunk_size(config, 256, torch.device("cpu"))
    check_chunk_size(tiny_config(), 256, torch.device("cpu"))  # the default fits


def _features(tmp_path, labels):
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(pa.table({"image_id": np.zeros(len(labels), np.int64), "label": np.asarray(labels, np.int64)}),
                   path)
    return [path]


def test_features_of_another_vocabulary_are_refused(tmp_path):
    table = ClassTable.from_categories([{"id": i, "name": f"c{i}"} for i in range(3)], unseen=["c2"])
    check_features_cover(table, 3, _features(tmp_path, [0, 1, 3]))  # 3 = no object
    with pytest.raises(ConfigError, match="labels run from 0 to 7.*extracted for another vocabulary"):
        check_features_cover(table, 3, _features(tmp_path, [0, 7]))
    only_unseen = ClassTable.from_categories([{"id": i, "name": f"c{i}"} for i in range(3)], unseen=["c0", "c1", "c2"])
    with pytest.raises(ConfigError, match="no seen class"):
        check_features_cover(only_unseen, 3, _features(tmp_path, [0, 1]))


def test_the_trainer_gives_appended_classes_new_classifier_rows_and_trains_them(tmp_path):
    from pading.training.generator import GeneratorTrainer

    base = ClassTable.from_categories([{"id": i, "name": f"c{i}"} for i in range(4)], unseen=["c3"])
    table = extend_with_unseen(base, _names_file(tmp_path, "traffic cone\nsnow plough\n"))
    head = torch.nn.Linear(8, base.num_classes + 1)
    config = tiny_config(generator={"num_primitives": 8}, generator_training={"unseen_classes_per_step": 3})
    trainer = GeneratorTrainer(table, torch.randn(table.num_classes, 6), 8, config, class_head=head)
    weight = trainer.classifier.linear.weight
    assert weight.shape == (table.num_classes + 1, 8)
    assert torch.equal(weight[:4], head.weight[:4]) and torch.equal(weight[-1], head.weight[-1])  # old rows kept
    before = weight[4:6].detach().clone()
    labels = torch.tensor([0, 1, 2, 0, 6, 6])  # 6 = no object of the extended table
    for _ in range(3):
        trainer.step(torch.randn(6, 8), labels)
    assert not torch.equal(trainer.classifier.linear.weight[4:6], before)  # the appended rows train
    with pytest.raises(Exception, match="class_head"):  # a head that fits neither table
        GeneratorTrainer(table, torch.randn(table.num_classes, 6), 8, config, class_head=torch.nn.Linear(8, 3))
