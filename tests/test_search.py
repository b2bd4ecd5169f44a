"""pading.run.search (the pseudo-unseen protocol, scoring, config overrides), pading.run.tables
(aggregation, Markdown/CSV) and pading.run.table_figures: fast, no Ray."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pading.classes import ClassTable
from pading.config import TuneConfig, apply_overrides, load_config, tiny_config
from pading.errors import ConfigError
from pading.run.search import (
    FeatureArrays,
    SearchSplit,
    choose_pseudo_unseen,
    holdout_rows,
    mean_class_accuracy,
    paper_split,
    pseudo_unseen_split,
    score_classifier,
    search_class_head,
    train_and_score,
    validate_search_space,
)
from pading.run.table_figures import bar_chart, tsne_figure
from pading.run.tables import DERIVED_PROTOCOL_NOTE, RowSpec, aggregate, format_markdown, table_rows, write_csv
from pading.training.generator import GeneratorTrainer

EMBED_DIM = 8
QUERIES = 4


def _table() -> ClassTable:
    categories = [{"id": i + 1, "name": f"class{i}", "isthing": int(i % 2 == 0)} for i in range(8)]
    return ClassTable.from_categories(categories, unseen=["class7"])


def _features(table: ClassTable, num_images: int = 40, seed: int = 0) -> FeatureArrays:
    """QUERIES rows per image: two matched seen queries (classes by image), the rest no object.
    Image 999 additionally holds a query of the real unseen class (it must never be used)."""
    rng = np.random.default_rng(seed)
    labels, image_ids = [], []
    seen = table.seen_indices
    for image in range(num_images):
        first, second = seen[image % len(seen)], seen[(image * 3 + 1) % len(seen)]
        labels += [first, second] + [table.no_object_index] * (QUERIES - 2)
        image_ids += [image] * QUERIES
    labels += [table.unseen_indices[0], seen[0], table.no_object_index, table.no_object_index]
    image_ids += [999] * QUERIES
    labels = np.asarray(labels, dtype=np.int64)
    centres = rng.normal(size=(table.num_classes + 1, EMBED_DIM)).astype(np.float32)
    embeddings = centres[labels] + 0.1 * rng.normal(size=(len(labels), EMBED_DIM)).astype(np.float32)
    return FeatureArrays(embeddings, labels, np.asarray(image_ids, dtype=np.int64))


def _config():
    return tiny_config(segmenter={"preset": "tiny", "num_queries": QUERIES, "hidden_dim": EMBED_DIM},
                       generator={"num_primitives": 4, "num_layers": 1, "num_heads": 2, "feedforward_dim": 16},
                       generator_training={"batch_images": 4, "unseen_classes_per_step": 2})


def test_pseudo_unseen_split_withholds_pseudo_and_real_unseen_classes():
    table = _table()
    features = _features(table)
    split = pseudo_unseen_split(features, table, count=2, holdout_fraction=0.25, seed=3)
    pseudo = set(split.unseen_indices)
    real_unseen = set(table.unseen_indices)
    assert len(pseudo) == 2 and not pseudo & real_unseen and pseudo <= set(table.seen_indices)
    assert set(split.table.unseen_indices) == pseudo | real_unseen  # trials synthesise both
    # No training row is of a pseudo/real unseen class, nor of an image that has one.
    assert not set(split.train.labels.tolist()) & (pseudo | real_unseen)
    banned_images = set(features.image_ids[np.isin(features.labels, list(pseudo | real_unseen))].tolist())
    assert not set(split.train.image_ids.tolist()) & banned_images
    assert 999 not in split.validation.image_ids  # the image with a real unseen class is not scored either
    # Validation = matched queries of the withheld images; train and validation images are disjoint.
    assert (split.validation.labels < table.no_object_index).all()
    assert not set(split.train.image_ids.tolist()) & set(split.validation.image_ids.tolist())
    assert pseudo <= set(split.validation.labels.tolist())
    assert set(split.seen_indices) == set(split.validation.labels.tolist()) - pseudo
    # Deterministic from the seed.
    again = pseudo_unseen_split(features, table, count=2, holdout_fraction=0.25, seed=3)
    assert again.unseen_indices == split.unseen_indices and np.array_equal(again.train.labels, split.train.labels)


def test_pseudo_unseen_classes_start_from_an_unseen_class_head_row():
    """The pretrained head learnt the pseudo-unseen classes from their labels (they were seen
    in pretraining); a trial's classifier must start them as a real unseen class starts."""
    table = _table()
    split = pseudo_unseen_split(_features(table), table, count=2, holdout_fraction=0.25, seed=3)
    head = torch.nn.Linear(EMBED_DIM, table.num_classes + 1)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    start = search_class_head(head, split, table)
    pseudo, real = list(split.unseen_indices), list(table.unseen_indices)
    assert torch.equal(head.weight, before[0]) and torch.equal(head.bias, before[1])  # a copy is changed
    for index in pseudo:
        assert torch.allclose(start.weight[index], before[0][real].mean(0))
        assert torch.allclose(start.bias[index], before[1][real].mean())
    others = [i for i in range(table.num_classes + 1) if i not in pseudo]
    assert torch.equal(start.weight[others], before[0][others]) and torch.equal(start.bias[others], before[1][others])
    paper = SearchSplit("paper", table, split.train, split.validation, split.seen_indices, tuple(real))
    assert search_class_head(head, paper, table) is head


def test_the_trainer_never_receives_unseen_features(monkeypatch):
    """Instrument GeneratorTrainer.step: every label it sees is seen-in-training or no object."""
    table = _table()
    split = pseudo_unseen_split(_features(table), table, count=2, holdout_fraction=0.25, seed=0)
    received = []
    original = GeneratorTrainer.step

    def spy(self, embeddings, labels):
        received.append(labels.clone())
        return original(self, embeddings, labels)

    monkeypatch.setattr(GeneratorTrainer, "step", spy)
    reports = []
    semantics = np.random.default_rng(0).normal(size=(table.num_classes, 6)).astype(np.float32)
    last = train_and_score(split, semantics, _config(), iterations=6, report_every=3,
                           callback=lambda metrics, trainer: reports.append(metrics))
    labels = set(torch.cat(received).tolist())
    assert len(received) == 6
    assert not labels & (set(split.unseen_indices) | set(table.unseen_indices))
    assert labels <= set(split.table.seen_indices) | {table.no_object_index}
    assert [r["step"] for r in reports] == [3.0, 6.0] and last == reports[-1]
    for metrics in reports:
        assert 0.0 <= metrics["score"] <= 100.0 and math.isfinite(metrics["classifier_loss"])


def test_choose_pseudo_unseen_needs_a_seen_class_left():
    table = _table()
    labels = np.asarray([0, 1, table.no_object_index])
    assert choose_pseudo_unseen(table, labels, 1, seed=0) in ([0], [1])
    with pytest.raises(ConfigError, match="pseudo_unseen_count"):
        choose_pseudo_unseen(table, labels, 2, seed=0)


def test_holdout_is_a_stable_function_of_the_image():
    ids = np.repeat(np.arange(200), 3)
    held = holdout_rows(ids, 0.3, seed=1)
    assert np.array_equal(held, holdout_rows(ids[::-1], 0.3, seed=1)[::-1])  # order does not matter
    per_image = held.reshape(200, 3)
    assert (per_image == per_image[:, :1]).all()  # whole images
    assert 0.2 < per_image[:, 0].mean() < 0.4
    assert not np.array_equal(held, holdout_rows(ids, 0.3, seed=2))


def test_mean_class_accuracy_and_score_by_hand():
    labels = np.asarray([0, 0, 0, 0, 1, 2, 2])
    predicted = np.asarray([0, 0, 1, 1, 1, 0, 2])
    # class 0: 2/4, class 1: 1/1, class 2: 1/2; class 5 absent -> not averaged
    assert mean_class_accuracy(predicted, labels, [0, 1, 5]) == pytest.approx(75.0)
    assert mean_class_accuracy(predicted, labels, [2]) == pytest.approx(50.0)
    assert mean_class_accuracy(predicted, labels, [5]) == 0.0

    table = _table()
    classifier = torch.nn.Linear(3, table.num_classes + 1)
    with torch.no_grad():  # logits = one-hot of the embedding's argmax; "no object" column always largest
        classifier.weight.zero_()
        classifier.bias.zero_()
        for k in range(3):
            classifier.weight[k, k] = 1.0
        classifier.bias[table.no_object_index] = 10.0
    embeddings = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]  # predicted 0, 0, 1, 2
    validation = FeatureArrays(embeddings, np.asarray([0, 1, 1, 2]), np.zeros(4, dtype=np.int64))
    split = SearchSplit("pseudo_unseen", table, validation, validation, seen_indices=(0, 1), unseen_indices=(2,))
    score = score_classifier(classifier, split)  # seen: (1 + 1/2) / 2 = 75, unseen 100 -> HM 600/7
    assert score["seen_accuracy"] == pytest.approx(75.0)
    assert score["unseen_accuracy"] == pytest.approx(100.0)
    assert score["score"] == pytest.approx(2 * 75 * 100 / 175)


def test_paper_split_scores_real_unseen_classes():
    table = _table()
    unseen = table.unseen_indices[0]
    val = FeatureArrays(np.zeros((4, EMBED_DIM), np.float32), np.asarray([0, unseen, table.no_object_index, 2]),
                        np.arange(4))
    split = paper_split(_features(table), val, table)
    assert split.unseen_indices == (unseen,) and split.seen_indices == (0, 2) and len(split.validation) == 3


def test_feature_batches_repeat_and_resume():
    from pading.data.features import epoch_indices

    first = list(itertools.islice(epoch_indices(23, 5, seed=0), 12))
    assert [len(b) for b in first[:5]] == [5, 5, 5, 5, 3]  # one epoch: 5 batches, the last shorter
    assert sorted(np.concatenate(first[:5]).tolist()) == list(range(23))  # a permutation
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch_indices(23, 5, seed=0)))  # repeatable
    resumed = list(itertools.islice(epoch_indices(23, 5, seed=0, start_step=7), 5))
    assert all(np.array_equal(a, b) for a, b in zip(first[7:12], resumed))  # a resumed run sees the same batches
    assert not np.array_equal(first[0], next(epoch_indices(23, 5, seed=1)))


def test_apply_overrides_validates_like_yaml():
    config = _config()
    changed = apply_overrides(config, {"losses.disentangle_weight": np.float64(0.01), "generator.num_primitives": 7})
    assert changed.losses.disentangle_weight == 0.01 and type(changed.losses.disentangle_weight) is float
    assert changed.generator.num_primitives == 7 and config.generator.num_primitives == 4  # original untouched
    with pytest.raises(ConfigError):
        apply_overrides(config, {"generator.num_primitives": 0})
    with pytest.raises(ConfigError):
        apply_overrides(config, {"losses.no_such_key": 1})
    with pytest.raises(ConfigError):
        apply_overrides(config, {"losses.alignment_temperature": "warm"})


def test_tune_config_validates_the_search_space():
    validate_search_space(TuneConfig().search_space)
    with pytest.raises(ConfigError, match="protocol"):
        TuneConfig(protocol="peek")
    with pytest.raises(ConfigError, match="low > 0"):
        TuneConfig(search_space={"losses.disentangle_weight": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="expected one of"):
        TuneConfig(search_space={"losses.disentangle_weight": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="not a config key"):
        validate_search_space({"losses.lambda": {"choice": [1]}})
    config = load_config(None, ["tune.search_space={generator.num_primitives: {choice: [8, 16]}}"])
    assert config.tune.search_space == {"generator.num_primitives": {"choice": [8, 16]}}
    # YAML 1.1 reads 1e-5 (no dot) as text: a bound written so is still a number
    config = load_config(None, ["tune.search_space={losses.disentangle_weight: {loguniform: [1e-5, 1e-2]}}",
                                "pretrain.lr=3e-4"])
    assert config.tune.search_space == {"losses.disentangle_weight": {"loguniform": [1e-5, 1e-2]}}
    assert config.pretrain.lr == 3e-4
    with pytest.raises(ConfigError, match="pretrain.lr: expected a number"):
        load_config(None, ["pretrain.lr=fast"])


def test_randint_bounds_are_both_sampled():
    from pipelines.tune import search_space

    domain = search_space({"generator.num_primitives": {"randint": [1, 2]}})["generator.num_primitives"]
    assert set(domain.sample(size=200, random_state=0)) == {1, 2}  # [low, high], as documented


def test_table_rows_aggregate_and_written_tables(tmp_path):
    config = load_config(None, ["tables.variants=[gmmn, full]", "tables.primitive_counts=[100, 400]"])
    rows = table_rows(config)
    assert [(r.table, r.key) for r in rows] == [("ablation", "gmmn-K400"), ("ablation", "full-K400"),
                                                 ("primitives", "full-K100"), ("primitives", "full-K400")]
    per_seed = [{"panoptic.hm.pq": 1.0, "semantic.seen.miou": 4.0}, {"panoptic.hm.pq": 3.0, "semantic.seen.miou": 4.0},
                {"panoptic.hm.pq": 5.0, "semantic.seen.miou": 4.0}]
    stats = aggregate(per_seed)
    assert stats["panoptic.hm.pq"] == {"mean": 3.0, "std": pytest.approx(2.0)}  # sample std of 1, 3, 5
    assert stats["semantic.seen.miou"]["std"] == 0.0
    spec = RowSpec("ablation", "full", 400, "+ alignment and disentanglement")
    markdown = format_markdown([(spec, stats)], seeds=(0, 1, 2))
    assert "| + alignment and disentanglement | 3.0 ± 2.0 | 4.0 ± 0.0 |" in markdown
    assert "ZSP HM PQ" in markdown.splitlines()[0] and "seeds 0, 1, 2" in markdown
    assert "derived from the panoptic" not in markdown  # no data format given
    panoptic = format_markdown([(spec, stats)], seeds=(0, 1, 2), data_format="panoptic")
    assert panoptic.splitlines()[-1] == DERIVED_PROTOCOL_NOTE and panoptic.startswith(markdown)
    only_pq = format_markdown([(spec, {"panoptic.hm.pq": stats["panoptic.hm.pq"]})], seeds=(0,), data_format="panoptic")
    assert "derived from the panoptic" not in only_pq  # no ZSI / ZSS column, no note
    path = write_csv(tmp_path / "t.csv", [(spec, stats)], seeds=(0, 1, 2))
    record = next(csv.DictReader(path.open()))
    assert float(record["panoptic.hm.pq_mean"]) == 3.0 and record["variant"] == "full"


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 5], 12)
    panels = {name: (rng.normal(size=(24, 6)) + labels[:, None], labels) for name in ("GMMN", "PADing")}
    tsne = tsne_figure(panels, {3: "cat", 5: "dog"}, tmp_path / "tsne.png", seed=0)
    bars = bar_chart(["a", "b"], [1.0, 2.0], [0.1, 0.2], tmp_path / "bars.png")
    for path in (tsne, bars):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_the_best_trial_is_the_best_complete_finite_one():
    from pading.errors import DataError
    from pading.run.search import best_trial

    def trial(tid, score, completed=True, error=""):
        return {"trial_id": tid, "score": score, "completed": completed, "error": error}

    trials = [trial("a", 30.0, completed=False), trial("b", 20.0), trial("c", float("nan")),
              trial("d", 50.0, error="boom"), trial("e", 20.0)]
    assert best_trial(trials)["trial_id"] == "b"  # a stopped early; c not finite; d failed; b before e on a tie
    assert best_trial([trial("a", 30.0, completed=False)])["trial_id"] == "a"  # none complete: among all
    with pytest.raises(DataError, match="no trial reported a score"):
        best_trial([trial("d", 50.0, error="boom")])


def test_the_best_config_has_its_own_output(tmp_path):
    from pading.config import tiny_config
    from pading.run.search import best_config

    config = tiny_config()
    best = best_config(config, {"generator.num_primitives": 16}, tmp_path / "best_run")
    assert best.generator.num_primitives == 16 and best.output_dir == str(tmp_path / "best_run")
    assert best.name == f"{config.name}-tuned" and config.generator.num_primitives != 16


def test_the_trials_settings_are_drawn_from_the_runs_seed(tmp_path):
    from ray.tune.experiment import Experiment

    from pipelines.tune import search_algorithm, search_space

    def draws(seed: int) -> list[dict]:
        config = load_config(None, [f"seed={seed}"])
        algorithm = search_algorithm(config)
        algorithm.add_configurations([Experiment("draws", lambda _: None, config=search_space(config.tune.search_space),
                                                 num_samples=3, storage_path=str(tmp_path))])
        trials = iter(algorithm.next_trial, None)
        return [trial.config for trial in trials]

    first = draws(0)
    assert len(first) == 3 and draws(0) == first  # the same seed: the same trials
    assert draws(1) != first
