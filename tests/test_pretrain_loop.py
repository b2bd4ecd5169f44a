"""The pretraining loop without Ray (:func:`pading.training.pretrain.fit_segmenter`): steps and
history, exact resume from a state dict, the weight average, skipped unusable batches.
tests/test_pipeline.py checks that the Ray Train stage on one worker computes what this loop
computes; tests/test_distributed.py that 2 workers compute what 1 does."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

STEPS = 4


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    from pading.config import DataConfig, tiny_config
    from pading.data import write_synthetic_dataset
    from pading.data.manifest import class_table_for, read_split_index, to_rows

    root = tmp_path_factory.mktemp("pretrain-loop")
    write_synthetic_dataset(root, num_train=8, num_val=2, image_size=48, seed=3)
    data = DataConfig(root=str(root), image_size=48)
    records, categories, _ = read_split_index(data, "train")
    table = class_table_for(data, categories)
    config = tiny_config(data={"root": str(root), "image_size": 48}, segmenter={"train_num_points": 64},
                         pretrain={"batch_size": 2, "lr": 1e-3, "iterations": STEPS, "ema_decay": 0.5,
                                   "warmup_steps": 2})
    return config, table, to_rows(records, table)


def _trainer(config, table):
    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import SegmenterTrainer

    torch.manual_seed(config.seed)
    return SegmenterTrainer(Segmenter(config.segmenter, table.num_classes), config)


def _drop_time(history):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


@pytest.fixture(scope="module")
def straight(problem):
    from pading.training.pretrain import fit_segmenter

    torch.set_num_threads(1)
    config, table, rows = problem
    trainer = _trainer(config, table)
    seen = []
    last = fit_segmenter(trainer, rows, table, on_step=lambda t, row: seen.append(row["step"]))
    return trainer, last, seen


def test_the_mask_terms_are_divided_by_the_steps_whole_target_count(problem, monkeypatch):
    """Each step's micro-batches share one divisor for their mask terms: the targets of the
    whole global batch (over every worker; here one) over the number of micro-batches, so
    DDP's average over workers of the mean over micro-batches is the mean over every target,
    as Mask2Former's all-reduced count makes it."""
    import pading.training.pretrain as pretrain

    config, table, rows = problem
    config = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, grad_accumulation=2,
                                                                      iterations=2))
    seen, real_step = [], pretrain.pretrain_step

    def step(model, optimizer, micro, **kwargs):
        seen.append((sum(len(labels) for batch in micro for labels in batch["class_labels"]), kwargs["num_masks"]))
        return real_step(model, optimizer, micro, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_step", step)
    pretrain.fit_segmenter(_trainer(config, table), rows, table)
    assert len(seen) == 2 and all(count > 2 for count, _ in seen)
    assert [divisor for _, divisor in seen] == [count / 2 for count, _ in seen]


def test_the_loop_takes_its_steps_and_records_them(straight, problem):
    config = problem[0]
    trainer, last, seen = straight
    assert trainer.step_count == STEPS and seen == list(range(1, STEPS + 1))
    assert [row["step"] for row in trainer.history] == seen and last == trainer.history[-1]
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in trainer.history)
    assert trainer.history[0]["lr"] == pytest.approx(config.pretrain.lr / 2)  # warm-up step 1 of 2


def test_a_resumed_run_equals_a_straight_one(straight, problem):
    from pading.training.pretrain import fit_segmenter

    torch.set_num_threads(1)
    config, table, rows = problem
    first = _trainer(config, table)

    def stop_half_way(trainer, row):
        if trainer.step_count == STEPS // 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):  # as if the process died after step 2's checkpoint
        fit_segmenter(first, rows, table, on_step=stop_half_way)
    state = first.state_dict()
    resumed = _trainer(config, table)
    resumed.load_state_dict(torch.load(_roundtrip(state), weights_only=True), first.history)
    fit_segmenter(resumed, rows, table)
    reference = straight[0]
    assert _drop_time(resumed.history) == _drop_time(reference.history)
    for key, value in reference.segmenter.state_dict().items():
        assert torch.equal(resumed.segmenter.state_dict()[key], value), key
    averaged, resumed_average = reference.result().state_dict(), resumed.result().state_dict()
    assert all(torch.equal(averaged[k], resumed_average[k]) for k in averaged)
    assert any(not torch.equal(averaged[k], v) for k, v in reference.segmenter.state_dict().items()
               if v.is_floating_point())  # the average is not the last weights


class _Interrupted(Exception):
    pass


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_finished_trainer_does_nothing(straight, problem):
    from pading.training.pretrain import fit_segmenter

    trainer = straight[0]
    before = len(trainer.history)
    assert fit_segmenter(trainer, problem[2], problem[1]) == {} and len(trainer.history) == before


def test_batches_without_a_loadable_image_are_skipped_then_refused(problem, monkeypatch):
    from pading.errors import DataError
    from pading.training import pretrain
    from pading.training.pretrain import fit_segmenter

    config, table, rows = problem
    broken = [{**row, "image_path": row["image_path"] + ".missing"} for row in rows]
    monkeypatch.setattr(pretrain, "MAX_EMPTY_BATCHES", 3)
    trainer = _trainer(config, table)
    with pytest.raises(DataError, match="no usable image in the last 3 batches"):
        fit_segmenter(trainer, broken, table)
    assert trainer.step_count == 0 and trainer.batches_drawn == 4

    mixed = broken[:6] + rows[6:]  # a global batch of two broken rows is skipped, the others train
    monkeypatch.setattr(pretrain, "MAX_EMPTY_BATCHES", 50)
    trainer = _trainer(config, table)
    fit_segmenter(trainer, mixed, table)
    assert trainer.step_count == STEPS and trainer.batches_drawn > STEPS


def test_one_checkpoint_format_for_every_trainer(straight, tmp_path):
    """pading.run.checkpoint: the state and history round-trip; a checkpoint written under an
    earlier name (train_state.pt, generator_state.pt) still resumes; a directory without one
    is refused by name."""
    from pading.errors import DataError
    from pading.run.checkpoint import STATE_FILE, read_checkpoint, write_checkpoint

    trainer = straight[0]
    directory = write_checkpoint(tmp_path / "ckpt", trainer.state_dict(), trainer.history)
    state, history = read_checkpoint(directory)
    assert history == trainer.history and state["step"] == trainer.step_count
    assert all(torch.equal(state["model"][k], v) for k, v in trainer.segmenter.state_dict().items())
    (directory / STATE_FILE).rename(directory / "train_state.pt")
    assert read_checkpoint(directory)[0]["step"] == trainer.step_count
    with pytest.raises(DataError, match="not a checkpoint"):
        read_checkpoint(tmp_path)


def test_kept_decoded_samples_equal_decoding_again_and_respect_the_budget(problem):
    from pading.training.pretrain import DecodedSamples, load_training_batch

    config, table, rows = problem
    kept = DecodedSamples(table, "panoptic", budget_mb=64)
    for _ in range(2):  # the second pass is served from memory
        cached, _ = load_training_batch(rows[:4], table, "panoptic", 48, samples=kept)
    fresh, _ = load_training_batch(rows[:4], table, "panoptic", 48)
    assert len(kept.samples) == 4 and kept.used > 0
    assert torch.equal(cached["pixel_values"], fresh["pixel_values"])
    for a, b in zip(cached["mask_labels"] + cached["class_labels"], fresh["mask_labels"] + fresh["class_labels"]):
        assert torch.equal(a, b)

    one_row = sum(array.nbytes for array in kept.load(rows[0]))
    small = DecodedSamples(table, "panoptic", budget_mb=1.5 * one_row / (1 << 20))
    for row in rows[:4]:
        small.load(row)
    assert len(small.samples) == 1 and small.used <= small.budget  # full after one row: the rest decoded each time
    nothing = DecodedSamples(table, "panoptic", budget_mb=0)
    nothing.load(rows[0])
    assert not nothing.samples


def test_a_bad_row_is_reported_every_time_it_is_drawn(problem, tmp_path):
    from pading.training.pretrain import DecodedSamples, load_training_batch

    config, table, rows = problem
    broken = {**rows[0], "image_path": str(tmp_path / "missing.jpg")}
    kept = DecodedSamples(table, "panoptic", budget_mb=64)
    for _ in range(2):
        batch, rejects = load_training_batch([broken, rows[1]], table, "panoptic", 48, samples=kept)
        assert len(rejects) == 1 and "missing.jpg" in rejects[0]["source"] and batch["pixel_values"].shape[0] == 1


def test_a_row_that_breaks_the_decoder_is_a_reject_not_a_crash(problem, monkeypatch):
    """Not every decoder failure is the library's DataError (a codec's own exception, say):
    the row is reported and the step goes on with the others."""
    from pading.training.pretrain import DecodedSamples, load_training_batch

    config, table, rows = problem
    samples = DecodedSamples(table, "panoptic", budget_mb=0)
    real_load = samples.load

    def load(row):
        if row is rows[0]:
            raise ValueError("codec state is broken")
        return real_load(row)

    monkeypatch.setattr(samples, "load", load)
    batch, rejects = load_training_batch([rows[0], rows[1]], table, "panoptic", 48, samples=samples)
    assert batch["pixel_values"].shape[0] == 1 and len(rejects) == 1
    assert rejects[0]["reason"] == "cannot load: ValueError: codec state is broken"
    assert rejects[0]["source"] == str(rows[0]["image_path"])
