"""pading.model.classifier and pading.training.generator: class weights, head init, expansion, the
interleaved generator/classifier trainer on a toy problem, checkpoint round-trip."""

import io

import pytest
import torch
import torch.nn.functional as F

from pading.classes import ClassTable
from pading.config import ABLATION_VARIANTS, GeneratorTrainingConfig, tiny_config
from pading.errors import ConfigError, DataError
from pading.model.classifier import (
    Classifier,
    ProjectionClassifier,
    class_weights,
    expand_classifier,
)
from pading.training.generator import GeneratorTrainer
from pading.training.refit import fit_added_classes, fit_classifier

SEMANTIC_DIM, EMBED_DIM = 8, 16
NUM_CLASSES = 6  # c0..c3 seen, c4 c5 unseen
NOISE_QUERIES = 16




@pytest.fixture(scope="module")
def table() -> ClassTable:
    categories = [{"id": 10 + i, "name": f"c{i}", "isthing": 1} for i in range(NUM_CLASSES)]
    return ClassTable.from_categories(categories, unseen=["c4", "c5"])


class ToyProblem:
    """Class features are a fixed linear function of the class semantics (+ noise),
    layer-normalised like the segmenter's query embeddings."""

    def __init__(self, seed: int = 1):
        self.rng = torch.Generator().manual_seed(seed)
        self.semantics = torch.randn(NUM_CLASSES, SEMANTIC_DIM, generator=self.rng)  # (C, S)
        self.mapping = torch.randn(SEMANTIC_DIM, EMBED_DIM, generator=self.rng)  # (S, D)

    def features(self, labels: torch.Tensor) -> torch.Tensor:
        raw = self.semantics[labels] @ self.mapping + 0.3 * torch.randn(labels.shape[0], EMBED_DIM, generator=self.rng)
        return F.layer_norm(raw, (EMBED_DIM,))

    def batch(self, num_matched: int = 48):
        labels = torch.randint(0, 4, (num_matched,), generator=self.rng)  # seen classes only
        unmatched = torch.randn(NOISE_QUERIES, EMBED_DIM, generator=self.rng)
        embeddings = torch.cat([self.features(labels), unmatched])  # (N, D)
        return embeddings, torch.cat([labels, torch.full((NOISE_QUERIES,), NUM_CLASSES)])


def _config(variant="full", **training):
    settings = {"iterations": 200, "generator_lr": 2e-3}
    settings.update(training)
    return tiny_config(losses={"variant": variant}, generator_training=settings)


# ---- classifier ----------------------------------------------------------------------------


def test_class_weights_values(table):
    weights = class_weights(table, GeneratorTrainingConfig())
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 0.1])


def test_classifier_from_class_head_copies_weights():
    head = torch.nn.Linear(EMBED_DIM, NUM_CLASSES + 1)
    classifier = Classifier.from_class_head(head)
    assert classifier.num_classes == NUM_CLASSES
    x = torch.randn(5, EMBED_DIM)
    assert torch.allclose(classifier(x), head(x))
    with torch.no_grad():
        head.weight.add_(1.0)  # a copy, not a reference
    assert not torch.allclose(classifier(x), head(x))
    with pytest.raises(DataError, match="class_head"):
        Classifier.from_class_head(torch.nn.Linear(EMBED_DIM, NUM_CLASSES + 1, bias=False))


def test_expand_classifier_keeps_existing_logits():
    classifier = Classifier(EMBED_DIM, NUM_CLASSES)
    x = torch.randn(5, EMBED_DIM)
    expanded = expand_classifier(classifier, NUM_CLASSES + 2, generator=torch.Generator().manual_seed(0))
    before, after = classifier(x), expanded(x)
    assert after.shape == (5, NUM_CLASSES + 3)
    assert torch.allclose(after[:, :NUM_CLASSES], before[:, :NUM_CLASSES])
    assert torch.allclose(after[:, -1], before[:, -1])  # no object stays last
    with pytest.raises(DataError):
        expand_classifier(classifier, NUM_CLASSES - 1)


def test_projection_classifier_logits_and_expansion():
    semantics = torch.randn(NUM_CLASSES, SEMANTIC_DIM)
    classifier = ProjectionClassifier(EMBED_DIM, semantics, temperature=0.05)
    x = torch.randn(5, EMBED_DIM)
    logits = classifier(x)
    assert logits.shape == (5, NUM_CLASSES + 1)
    assert logits.abs().max() <= 1.0 / 0.05 + 1e-4  # cosine / temperature
    assert "class_semantics" in dict(classifier.named_buffers())  # frozen text embeddings
    expanded = expand_classifier(classifier, NUM_CLASSES + 1, new_class_semantics=torch.randn(1, SEMANTIC_DIM))
    after = expanded(x)
    assert torch.allclose(after[:, :NUM_CLASSES], logits[:, :NUM_CLASSES], atol=1e-5)
    assert torch.allclose(after[:, -1], logits[:, -1], atol=1e-5)
    with pytest.raises(DataError, match="semantics"):
        expand_classifier(classifier, NUM_CLASSES + 1)


# ---- trainer -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ABLATION_VARIANTS)
def test_each_variant_builds_and_steps(table, variant):
    problem = ToyProblem()
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config(variant))
    for _ in range(2):
        metrics = trainer.step(*problem.batch())
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert metrics["step"] == 2.0 and metrics["classifier/loss"] > 0
    if variant == "projection":
        assert trainer.generator is None and isinstance(trainer.classifier, ProjectionClassifier)
        assert "generator/mmd" not in metrics
        with pytest.raises(ConfigError):
            trainer.synthesize(torch.tensor([4]), 2)
        return
    assert metrics["classifier/num_synthetic"] > 0  # unseen synthetic embeddings joined the batch
    lambda_terms = [metrics[f"generator/{name}"] for name in ("alignment", "unrelated", "relation", "reconstruction")]
    if variant in ("gmmn", "primitive"):
        assert lambda_terms == [0.0, 0.0, 0.0, 0.0]
    elif variant == "alignment":
        assert lambda_terms[0] > 0 and lambda_terms[1:] == [0.0, 0.0, 0.0]
    else:
        assert all(term > 0 for term in lambda_terms)
    kind = type(trainer.generator).__name__
    assert kind == ("GMMNGenerator" if variant == "gmmn" else "PrimitiveGenerator")


def test_mmd_decreases_on_toy_problem(table):
    problem = ToyProblem()
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("full"))
    mmd = [trainer.step(*problem.batch())["generator/mmd"] for _ in range(150)]
    first, last = sum(mmd[:10]) / 10, sum(mmd[-10:]) / 10
    assert last < 0.5 * first
    # lr decayed at 70% of 200 iterations
    assert trainer.generator_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.1)
    samples = trainer.synthesize(torch.tensor([4, 5]), 3)
    assert samples.shape == (6, EMBED_DIM)


def test_trainer_is_repeatable_and_resumes_identically(table):
    problem = ToyProblem()
    batches = [problem.batch() for _ in range(5)]
    first = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("full"))
    for batch in batches[:3]:
        first.step(*batch)
    primitives_after_three = first.generator.primitives.detach().clone()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("full"))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step_count == 3
    steps_four_and_five = [first.step(*batch) for batch in batches[3:]]
    assert steps_four_and_five == [resumed.step(*batch) for batch in batches[3:]]
    for a, b in zip(first.generator.parameters(), resumed.generator.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(first.classifier.linear.weight, resumed.classifier.linear.weight)
    # rewound in place: what it drew ahead for its next step (another seed) is not used
    buffer.seek(0)
    first.load_state_dict(torch.load(buffer, weights_only=True))
    assert [first.step(*batch) for batch in batches[3:]] == steps_four_and_five
    # a second run from scratch with the same seed repeats the first exactly
    again = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("full"))
    for batch in batches[:3]:
        again.step(*batch)
    assert torch.equal(again.generator.primitives, primitives_after_three)


def test_dropout_drawn_ahead_leaves_every_step_as_the_default_generator_gives_it(table, monkeypatch):
    """On the CPU each step draws the next step's dropout uniforms on a helper thread; the steps
    must be bitwise those of drawing each mask from the default generator when it is needed."""
    import contextlib

    import pading.training.generator as module

    problem = ToyProblem()
    batches = [problem.batch() for _ in range(4)]

    def run() -> tuple[list[dict], list[torch.Tensor]]:
        trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("full"))
        metrics = [trainer.step(*batch) for batch in batches]
        return metrics, [p.detach().clone() for p in trainer.generator.parameters()]

    ahead_metrics, ahead_weights = run()
    monkeypatch.setattr(module, "drawing_from", lambda tape: contextlib.nullcontext())  # the default generator
    plain_metrics, plain_weights = run()
    assert ahead_metrics == plain_metrics
    assert all(torch.equal(a, b) for a, b in zip(ahead_weights, plain_weights))


def test_trainer_uses_class_head_and_skips_generator_without_seen_queries(table):
    problem = ToyProblem()
    head = torch.nn.Linear(EMBED_DIM, NUM_CLASSES + 1)
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("primitive"), class_head=head)
    assert torch.equal(trainer.classifier.linear.weight, head.weight)
    primitives = trainer.generator.primitives.detach().clone()
    embeddings = torch.randn(8, EMBED_DIM)
    labels = torch.full((8,), NUM_CLASSES)  # only "no object"
    metrics = trainer.step(embeddings, labels)
    assert "generator/mmd" not in metrics and metrics["classifier/loss"] > 0
    assert torch.equal(trainer.generator.primitives, primitives)
    with pytest.raises(DataError, match="class_head"):
        GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config(), class_head=torch.nn.Linear(EMBED_DIM, 3))


def test_trainer_rejects_bad_batches(table):
    problem = ToyProblem()
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("primitive"))
    with pytest.raises(DataError, match="labels"):
        trainer.step(torch.randn(4, EMBED_DIM), torch.tensor([0, 1, 2, NUM_CLASSES + 1]))
    with pytest.raises(DataError, match="embeddings"):
        trainer.step(torch.randn(4, EMBED_DIM + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DataError, match="class_semantics"):
        GeneratorTrainer(table, problem.semantics[:3], EMBED_DIM, _config())


def _trained_with_one_more_class(table):
    """A briefly trained toy generator, a new class's semantics and the classifier expanded by one row."""
    problem = ToyProblem()
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM, _config("primitive"))
    for _ in range(30):
        trainer.step(*problem.batch())
    new_semantics = torch.randn(1, SEMANTIC_DIM, generator=problem.rng)
    return trainer, problem, new_semantics, expand_classifier(trainer.classifier, NUM_CLASSES + 1)


def test_fit_classifier_learns_an_added_class(table):
    trainer, problem, new_semantics, classifier = _trained_with_one_more_class(table)
    added_index = NUM_CLASSES  # the new class; no object is now NUM_CLASSES + 1
    real_embeddings, real_labels = problem.batch()
    real_labels = torch.where(real_labels == NUM_CLASSES, NUM_CLASSES + 1, real_labels)
    weights = torch.ones(NUM_CLASSES + 2)

    def synthesize(class_indices, per_class):
        assert class_indices.tolist() == [added_index]
        return trainer.synthesize_from_semantics(new_semantics, per_class)

    losses = fit_classifier(
        classifier,
        real_embeddings,
        real_labels,
        synthesize,
        torch.tensor([added_index]),
        steps=40,
        weights=weights,
        config=GeneratorTrainingConfig(classifier_lr=0.05),
        per_class=8,
        batch_size=32,
    )
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    with torch.no_grad():
        predicted = classifier(trainer.synthesize_from_semantics(new_semantics, 16)).argmax(dim=1)
    assert (predicted == added_index).float().mean() > 0.5


def test_fit_added_classes_trains_only_the_added_rows(table):
    """The serve-time re-fit (pading.serving.service): the added class is learned, the trained
    classes' and no object's rows are bit-identical, and the loss is the one fit_classifier
    computes on the same batches (the frozen logits are only cached, not changed)."""
    trainer, problem, new_semantics, classifier = _trained_with_one_more_class(table)
    before = classifier.linear.weight.detach().clone()
    added_index = NUM_CLASSES
    real_embeddings, real_labels = problem.batch()
    real_labels = torch.where(real_labels == NUM_CLASSES, NUM_CLASSES + 1, real_labels)
    synthetic = trainer.synthesize_from_semantics(new_semantics, 64, generator=torch.Generator().manual_seed(0))
    settings = dict(steps=40, weights=torch.ones(NUM_CLASSES + 2), config=GeneratorTrainingConfig(classifier_lr=0.05),
                    per_class=8, batch_size=32)

    def synthesize(class_indices, per_class):  # the same samples for both fits
        assert class_indices.tolist() == [added_index]
        return synthetic[:per_class]

    losses = fit_added_classes(classifier, NUM_CLASSES, real_embeddings, real_labels, synthesize,
                               torch.tensor([added_index]), **settings)
    after = classifier.linear.weight.detach()
    assert torch.equal(after[:NUM_CLASSES], before[:NUM_CLASSES]) and torch.equal(after[-1], before[-1])
    assert not torch.equal(after[added_index], before[added_index])
    assert sum(losses[-5:]) < sum(losses[:5])
    with torch.no_grad():
        predicted = classifier(trainer.synthesize_from_semantics(new_semantics, 16)).argmax(dim=1)
    assert (predicted == added_index).float().mean() > 0.5
    # Step 1 sees the same batch and the same weights as fit_classifier's step 1: the same loss.
    reference = expand_classifier(trainer.classifier, NUM_CLASSES + 1)
    with torch.no_grad():
        reference.linear.weight.copy_(before)
    first = fit_classifier(reference, real_embeddings, real_labels, synthesize, torch.tensor([added_index]),
                           **{**settings, "steps": 1})
    assert first[0] == pytest.approx(losses[0], rel=1e-5)


def test_the_learning_rate_decays_at_its_step_when_steps_had_no_seen_rows(table):
    # The milestones count the trainer's steps: steps whose batch had no seen query (no generator
    # update) still count, so the decay is not pushed later.
    problem = ToyProblem()
    trainer = GeneratorTrainer(table, problem.semantics, EMBED_DIM,
                               _config("primitive", iterations=4, lr_decay_at=[0.5], generator_lr=1e-3))
    no_object = (torch.randn(8, EMBED_DIM), torch.full((8,), NUM_CLASSES))
    metrics = [trainer.step(*batch) for batch in (no_object, no_object, problem.batch())]
    assert [m["generator/lr"] for m in metrics] == pytest.approx([1e-3, 1e-3, 1e-4])  # step 3 is past 50 % of 4
    assert "generator/mmd" in metrics[2]
