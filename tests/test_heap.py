"""The training loops' garbage-collector freeze (:func:`pading.training.heap.frozen_heap`):
objects alive when a loop starts are skipped by its collections and collectable again after
it, nested and concurrent loops share one freeze, and a process's own freeze is left alone."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from pading.training.heap import frozen_heap


class _Node:
    pass


_HELD: list = []  # keeps the cycles alive until a test drops them


def _cycle() -> weakref.ref:
    """A two-object reference cycle, kept alive in ``_HELD``; the weak reference tells whether
    the collector has freed it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    _HELD.append(a)
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def no_freeze():
    assert gc.get_freeze_count() == 0
    yield
    _HELD.clear()
    gc.unfreeze()


def test_what_was_alive_before_is_frozen_during_the_block_and_collectable_after():
    ref = _cycle()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        _HELD.clear()  # the cycle is garbage now, but frozen
        gc.collect()
        assert ref() is not None
        made_inside = _cycle()
        _HELD.clear()
        gc.collect()
        assert made_inside() is None  # what the loop makes is collected as usual
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_nested_and_concurrent_blocks_share_one_freeze():
    ref = _cycle()
    with frozen_heap():
        _HELD.clear()  # garbage, but frozen by the outer block
        with frozen_heap():
            pass
        gc.collect()
        assert ref() is not None  # the inner block did not unfreeze
        inside, leave = threading.Event(), threading.Event()

        def other_loop():
            with frozen_heap():
                inside.set()
                leave.wait(10)

        thread = threading.Thread(target=other_loop)
        thread.start()
        inside.wait(10)
    assert gc.get_freeze_count() > 0  # the thread's loop still runs
    leave.set()
    thread.join(10)
    assert gc.get_freeze_count() == 0


def test_an_exception_unfreezes_and_the_process_own_freeze_is_kept():
    with pytest.raises(ValueError):
        with frozen_heap():
            raise ValueError("stop")
    assert gc.get_freeze_count() == 0
    ref = _cycle()
    gc.freeze()  # e.g. a server that froze before forking its workers
    _HELD.clear()  # the cycle is garbage now, but in the process's own freeze
    with frozen_heap():
        pass
    # The count alone cannot tell: frozen objects that die by reference count (another thread's)
    # leave the permanent generation. A cycle can only stay if the freeze was kept.
    assert gc.get_freeze_count() > 0
    gc.collect()
    assert ref() is not None


def test_nothing_is_frozen_while_the_collector_is_disabled():
    gc.disable()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_both_training_loops_run_their_steps_in_a_frozen_heap(tmp_path):
    """fit_generator and fit_segmenter take every step inside the freeze and leave none."""
    import torch

    from pading.config import tiny_config
    from pading.data import write_synthetic_dataset
    from pading.data.manifest import class_table_for, read_split_index, to_rows
    from pading.model.segmenter import Segmenter
    from pading.training.generator import GeneratorTrainer, fit_generator
    from pading.training.pretrain import SegmenterTrainer, fit_segmenter

    write_synthetic_dataset(tmp_path, num_train=4, num_val=1, image_size=32, seed=1)
    config = tiny_config(data={"root": str(tmp_path), "image_size": 32}, segmenter={"train_num_points": 16},
                         pretrain={"batch_size": 2, "iterations": 2})
    records, categories, _ = read_split_index(config.data, "train")
    table = class_table_for(config.data, categories)
    frozen = []
    fit_segmenter(SegmenterTrainer(Segmenter(config.segmenter, table.num_classes), config),
                  to_rows(records, table), table, on_step=lambda t, row: frozen.append(gc.get_freeze_count() > 0))
    assert frozen == [True, True] and gc.get_freeze_count() == 0

    dim = 8
    trainer = GeneratorTrainer(table, torch.randn(table.num_classes, 16), dim, config)
    seen = table.seen_indices[:2]
    batches = ((torch.randn(6, dim), torch.tensor(seen * 3)) for _ in range(3))
    frozen.clear()
    fit_generator(trainer, batches, 3, on_step=lambda t, metrics: frozen.append(gc.get_freeze_count() > 0))
    assert frozen == [True, True, True] and gc.get_freeze_count() == 0
