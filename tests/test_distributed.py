"""Two Ray Train workers compute what one worker computes (gloo on CPU).

For the generator stage (the library's one loop, :func:`pading.training.generator.fit_generator`,
synchronised by :class:`pading.training.distributed.TorchCollective`) and for pretraining (DDP through
Ray Train's ``prepare_model``, :func:`pading.training.pretrain.fit_segmenter`), k steps on 2 Ray
Train workers, each given its half of every global batch, must end with the parameters of
one worker trained on the whole batches, and identical parameters on both ranks. The same
runs *without* the synchronisation must not: that is what makes the test able to fail. The
generator is also checked at 1,200 classes with the full objective over every class, where
each worker computes only its own rows' share of the batch-global terms: the per-step losses
must match too, and a worker's gradient share counted twice or dropped must be caught.

Exact equality needs the randomness to be partition-invariant. Generator noise, class
choices and pretraining's point sampling are (drawn per global row / per global
micro-batch); dropout masks are drawn by each worker for its own rows, so these runs turn
dropout off. Two parameters are compared leniently: the key bias of the generator's
cross-attention and the query and key biases of its self-attention (over a single token) have
analytically zero gradients (softmax is shift-invariant; a softmax over one key is 1), and
Adam turns float noise of ~1e-10 in them into steps of the learning rate's size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SEMANTIC_DIM, EMBED_DIM, NUM_CLASSES = 8, 16, 6  # c0..c3 seen, c4 c5 unseen
GENERATOR_STEPS, PRETRAIN_STEPS = 4, 3
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.common import TRAIN_POLL_ENV

    os.environ.setdefault(TRAIN_POLL_ENV, "0.25")  # as the stages do (ray.train_poll_s)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _fit_on_two_workers(train_func, loop_config: dict) -> None:
    """A Ray Train run on 2 workers, built as the stages build theirs (pipelines.common.torch_trainer)."""
    import ray.train

    from pipelines.common import torch_trainer

    torch_trainer(train_func, train_loop_config=loop_config,
                  scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                  run_config=ray.train.RunConfig(storage_path=str(Path(loop_config["out"]) / "ray"))).fit()


def _ray_process_titles() -> list[str]:
    """The titles (``ray::<class>``) of this machine's Ray worker processes."""
    titles = []
    for pid in os.listdir("/proc"):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::"):
            titles.append(title.split()[0])
    return sorted(titles)


def _compare(reference: dict, run: dict, skip_degenerate: bool = True) -> float:
    """Largest relative difference of ``run``'s parameters from ``reference`` (per tensor:
    max |a - b| / max |a|), leaving out the attention biases whose gradient is analytically zero."""
    worst = 0.0
    for name, expected in reference.items():
        got = run[name]
        if skip_degenerate and name.endswith("cross_attention.in_proj_bias"):  # without the key bias
            dim = expected.shape[0] // 3
            expected, got = torch.cat([expected[:dim], expected[2 * dim:]]), torch.cat([got[:dim], got[2 * dim:]])
        if skip_degenerate and name.endswith("self_attention.in_proj_bias"):  # the value bias only
            dim = expected.shape[0] // 3
            expected, got = expected[2 * dim:], got[2 * dim:]
        scale = float(expected.abs().max()) or 1.0
        worst = max(worst, float((got - expected).abs().max()) / scale)
    return worst


# ---- the generator stage --------------------------------------------------------------------

#: The small problem (6 classes) and the large-vocabulary one: 1,200 classes, 300 unseen, the full
#: objective over every class (no sampling) in chunks of 4,096 pairs.
SMALL = {"num_classes": NUM_CLASSES, "num_unseen": 2, "losses": {}}
LARGE = {"num_classes": 1200, "num_unseen": 300,
         "losses": {"relation_class_sample": 0, "unseen_class_sample": 0, "chunk_size": 4096}}


def _generator_problem(num_classes: int = NUM_CLASSES, num_unseen: int = 2, losses: dict | None = None):
    """A class table (the last ``num_unseen`` classes unseen), class semantics, GENERATOR_STEPS
    global batches of 32 query rows (20 matched seen queries and 12 "no object" each) and a
    config without dropout."""
    from pading.classes import ClassTable
    from pading.config import tiny_config

    table = ClassTable.from_categories([{"id": 10 + i, "name": f"c{i}", "isthing": 1} for i in range(num_classes)],
                                       unseen=[f"c{i}" for i in range(num_classes - num_unseen, num_classes)])
    rng = torch.Generator().manual_seed(0)
    semantics = torch.randn(num_classes, SEMANTIC_DIM, generator=rng)  # (C, S)
    batches = []
    for _ in range(GENERATOR_STEPS):
        labels = torch.cat([torch.randint(0, num_classes - num_unseen, (20,), generator=rng),
                            torch.full((12,), num_classes)])
        order = torch.randperm(32, generator=rng)
        embeddings = F.layer_norm(torch.randn(32, EMBED_DIM, generator=rng), (EMBED_DIM,))
        batches.append((embeddings[order], labels[order]))
    config = tiny_config(
        losses={"variant": "full", "disentangler_dropout": 0.0, "disentangle_weight": 0.5, **(losses or {})},
        generator={"dropout": 0.0}, generator_training={"iterations": GENERATOR_STEPS, "generator_lr": 1e-3})
    return table, semantics, batches, config


def _trainer_parameters(trainer) -> dict:
    modules = {"classifier": trainer.classifier, "generator": trainer.generator, "loss": trainer.loss}
    return {f"{prefix}.{name}": value.detach().clone() for prefix, module in modules.items()
            for name, value in module.state_dict().items()}


def _halves(batches, rank: int, world: int, empty_share: bool = True):
    """Rank ``rank``'s contiguous share of every global batch; with ``empty_share``, in the
    second batch the last rank holds no row at all (a worker may have nothing to contribute)."""
    out = []
    for step, (embeddings, labels) in enumerate(batches):
        size = -(-labels.shape[0] // world)
        if step == 1 and empty_share:
            size = -(-labels.shape[0] // max(1, world - 1)) if rank < world - 1 else 0
            start = rank * size
            out.append((embeddings[start:start + size], labels[start:start + size]))
            continue
        out.append((embeddings[rank * size:(rank + 1) * size], labels[rank * size:(rank + 1) * size]))
    return out


def _fit(problem: dict, collective=None, batches_of=lambda batches: batches):
    """Train GENERATOR_STEPS steps; returns (parameters, the generator/* losses of every step)."""
    from pading.training.generator import GeneratorTrainer, fit_generator

    table, semantics, batches, config = _generator_problem(**problem)
    trainer = GeneratorTrainer(table, semantics, EMBED_DIM, config, collective=collective)
    losses = []
    fit_generator(trainer, iter(batches_of(batches)), GENERATOR_STEPS,
                  on_step=lambda _, metrics: losses.append({k: v for k, v in metrics.items()
                                                            if k.startswith("generator/")}))
    return _trainer_parameters(trainer), losses


def _faulty_collectives():
    """Collectives with one deliberate fault each, which the comparison with one worker must catch."""
    from pading.training.distributed import LocalCollective, TorchCollective

    class ShareCountedTwice(TorchCollective):  # rank 0's gradient share enters the sum twice
        def sum_gradients_async(self, parameters, extras=None):
            parameters = list(parameters)
            for p in parameters:
                if p.grad is not None and self.rank == 0:
                    p.grad = p.grad * 2
            return super().sum_gradients_async(parameters, extras)

    class ShareDropped(TorchCollective):  # rank 1's gradient share never reaches the sum
        def sum_gradients_async(self, parameters, extras=None):
            parameters = list(parameters)
            for p in parameters:
                if p.grad is not None and self.rank == 1:
                    p.grad = torch.zeros_like(p.grad)
            return super().sum_gradients_async(parameters, extras)

    return {"synchronised": TorchCollective, "share-counted-twice": ShareCountedTwice,
            "share-dropped": ShareDropped, "without-sync": LocalCollective}


def _generator_worker(problem: dict, variants: list[str], out: Path, rank: int, world: int) -> None:
    results = {}
    for name, make in _faulty_collectives().items():
        if name in variants:  # alone (without sync), an empty batch is no step at all
            results[name] = _fit(problem, make(),
                                 lambda batches: _halves(batches, rank, world, empty_share=name != "without-sync"))
    torch.save(results, out / f"rank{rank}.pt")


def _loss_difference(reference: list[dict], run: list[dict]) -> float:
    """Largest relative difference of the per-step generator losses."""
    worst = 0.0
    for want, got in zip(reference, run, strict=True):
        for name, value in want.items():
            worst = max(worst, abs(got[name] - value) / max(abs(value), 1e-12))
    return worst


GENERATOR_PROBLEMS = {"6-classes": (SMALL, ["synchronised", "without-sync"]),
                      "1200-classes": (LARGE, list(_faulty_collectives()))}


@pytest.mark.parametrize("problem_id", list(GENERATOR_PROBLEMS))
def test_generator_two_workers_match_one(two_worker_runs, problem_id):
    """2 workers, each with half of every global batch, end where one worker on the whole
    batches ends (parameters and every step's losses); each fault breaks that."""
    problem, variants = GENERATOR_PROBLEMS[problem_id]
    reference_parameters, reference_losses = _fit(problem)  # one worker, this process
    ranks = [torch.load(two_worker_runs / f"generator-{problem_id}" / f"rank{r}.pt", weights_only=True)
             for r in range(2)]
    for name in variants:
        difference = _compare(reference_parameters, ranks[0][name][0])
        across_ranks = _compare(ranks[0][name][0], ranks[1][name][0], skip_degenerate=False)
        losses = _loss_difference(reference_losses, ranks[0][name][1])
        if name == "synchronised":
            assert difference < RELATIVE_TOLERANCE, (name, difference)
            assert losses < RELATIVE_TOLERANCE, (name, losses)
            assert across_ranks == 0.0
        else:  # the check above must catch every fault
            assert difference > 1e-2, (name, difference)


# ---- pretraining ------------------------------------------------------------------------------


def _pretrain_problem(data_root: str, grad_accumulation: int):
    """Config, class table and the manifest rows of PRETRAIN_STEPS global batches of 2 images."""
    from pading.config import DataConfig, tiny_config
    from pading.data.manifest import class_table_for, read_split_index, to_rows

    data = DataConfig(root=data_root, image_size=48)
    records, categories, _ = read_split_index(data, "train")
    table = class_table_for(data, categories)
    rows = to_rows(records, table)[: 2 * PRETRAIN_STEPS]
    config = tiny_config(data={"root": data_root, "image_size": 48}, segmenter={"train_num_points": 64},
                         pretrain={"batch_size": 2, "lr": 1e-3, "iterations": PRETRAIN_STEPS,
                                   "grad_accumulation": grad_accumulation})
    return config, table, rows


def _segmenter_parameters(segmenter) -> dict:
    return {name: value.detach().clone() for name, value in segmenter.named_parameters()}


def _fit_segmenter(config, table, rows, rank: int = 0, world: int = 1, wrap=None):
    """The library's pretraining loop (:func:`pading.training.pretrain.fit_segmenter`) from the
    seed's initial weights; ``wrap`` makes the module ``pretrain_step`` calls (DDP)."""
    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import SegmenterLoss, SegmenterTrainer, fit_segmenter

    torch.manual_seed(config.seed)
    segmenter = Segmenter(config.segmenter, table.num_classes)
    model = wrap(SegmenterLoss(segmenter)) if wrap is not None else None
    trainer = SegmenterTrainer(segmenter, config, model=model)
    fit_segmenter(trainer, rows, table, rank=rank, world=world)
    assert trainer.step_count == PRETRAIN_STEPS
    return segmenter


def _pretrain_worker(data: str, sync: bool, out: Path, rank: int, world: int) -> None:
    """Worker r of 2 takes image r of each global batch; DDP (Ray Train's prepare_model)
    averages the gradients, or nothing does (``sync`` off)."""
    from pipelines.common import prepare_model

    config, table, rows = _pretrain_problem(data, grad_accumulation=1)
    wrap = (lambda model: prepare_model(model, world)) if sync else None
    segmenter = _fit_segmenter(config, table, rows, rank=rank, world=world, wrap=wrap)
    torch.save(_segmenter_parameters(segmenter), out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> str:
    from pading.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("pretrain-data")
    write_synthetic_dataset(root, num_train=2 * PRETRAIN_STEPS, num_val=2, image_size=48, seed=5)
    return str(root)


@pytest.fixture(scope="module")
def pretrain_reference(pretrain_data) -> dict:
    """One worker accumulating both images of each global batch as two micro-batches."""
    torch.set_num_threads(1)
    config, table, rows = _pretrain_problem(pretrain_data, grad_accumulation=2)
    return _segmenter_parameters(_fit_segmenter(config, table, rows))


# ---- one Ray Train run on 2 workers for every case above -----------------------------------


def _two_worker_cases(loop_config: dict) -> None:
    """Every 2-worker case of this module, one after the other in one Ray Train run (a run's
    start-up, about 10 s here, is paid once): the generator problems with their collectives,
    then pretraining with and without DDP. Each case writes ``<out>/<case>/rank<r>.pt``."""
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    out = Path(loop_config["out"])
    if rank == 0:  # which helper actors the run started (the placement-group cleaner is up by now)
        (out / "ray-processes.json").write_text(json.dumps(_ray_process_titles()))
    for problem_id, (problem, variants) in GENERATOR_PROBLEMS.items():
        (out / f"generator-{problem_id}").mkdir(parents=True, exist_ok=True)
        _generator_worker(problem, variants, out / f"generator-{problem_id}", rank, world)
    for sync, case in ((True, "ddp"), (False, "without-ddp")):
        (out / f"pretrain-{case}").mkdir(parents=True, exist_ok=True)
        _pretrain_worker(loop_config["data"], sync, out / f"pretrain-{case}", rank, world)


@pytest.fixture(scope="module")
def two_worker_runs(ray_local, pretrain_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-workers")
    _fit_on_two_workers(_two_worker_cases, {"data": pretrain_data, "out": str(out)})
    return out


def test_the_runs_start_no_dataset_manager_and_no_placement_group_cleaner(two_worker_runs):
    """The stages' trainer (pipelines.common.torch_trainer) leaves out two helper actors of
    Ray Train that a run without Ray Datasets, on a Ray its driver started, does not need
    (docs/performance.md, "Ray Train's helper actors"): neither process runs during the run."""
    import ray.train

    from pipelines.common import torch_trainer

    titles = json.loads((two_worker_runs / "ray-processes.json").read_text())
    assert sum(title.startswith("ray::RayTrainWorker") for title in titles) >= 2, titles  # the scan sees the workers
    assert "ray::PlacementGroupCleaner" not in titles and "ray::DatasetManager" not in titles, titles
    callbacks = {type(callback).__name__ for callback in torch_trainer(
        _two_worker_cases, scaling_config=ray.train.ScalingConfig(num_workers=1))._create_default_callbacks()}
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"}.isdisjoint(callbacks), callbacks
    assert "BackendSetupCallback" in callbacks  # the rest are Ray Train's own


@pytest.mark.parametrize("case", ["ddp", "without-ddp"])
def test_pretraining_two_workers_match_one(two_worker_runs, pretrain_reference, case):
    sync = case == "ddp"
    ranks = [torch.load(two_worker_runs / f"pretrain-{case}" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    difference = _compare(pretrain_reference, ranks[0], skip_degenerate=False)
    across_ranks = _compare(ranks[0], ranks[1], skip_degenerate=False)
    if sync:
        assert difference < RELATIVE_TOLERANCE, difference
        assert across_ranks == 0.0
    else:
        assert difference > 1e-3 and across_ranks > 1e-4, (difference, across_ranks)
