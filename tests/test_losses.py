"""pading.model.losses: MMD, relationship alignment, disentanglement, total loss per variant."""

import math

import pytest
import torch

from pading.model.losses import (
    Disentangler,
    composed_alignment_loss,
    mmd_loss,
    relation_loss,
    relationship_alignment_loss,
    relationship_kl,
    unrelated_noise_loss,
)

EMBED_DIM, NUM_CLASSES = 16, 6
SIGMAS_SQUARED = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)




@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- MMD ---------------------------------------------------------------------------------


def test_mmd_hand_computed_single_points():
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])  # ‖x − y‖² = 1
    expected = math.sqrt(sum(2.0 - 2.0 * math.exp(-1.0 / (2.0 * s)) for s in (1.0, 4.0)))
    assert mmd_loss(x, y, (1.0, 4.0)).item() == pytest.approx(expected, rel=1e-5)


def test_mmd_zero_for_identical_sets_with_finite_gradient():
    x = torch.randn(20, EMBED_DIM, requires_grad=True)
    loss = mmd_loss(x, x.detach().clone(), SIGMAS_SQUARED)
    assert loss.item() < 1e-3
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_mmd_grows_monotonically_with_mean_shift():
    x = torch.randn(32, EMBED_DIM)
    y = torch.randn(32, EMBED_DIM)
    values = [mmd_loss(x, y + shift, SIGMAS_SQUARED).item() for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_mmd_gradient_pulls_sets_together():
    x = (torch.randn(16, EMBED_DIM) + 2.0).requires_grad_()
    y = torch.randn(16, EMBED_DIM)
    loss = mmd_loss(x, y, SIGMAS_SQUARED)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.mean() > 0  # x sits at +2: descending moves it towards y


# ---- alignment ---------------------------------------------------------------------------


def test_alignment_zero_when_visual_matches_semantic():
    class_embeddings = torch.randn(NUM_CLASSES, EMBED_DIM)
    labels = torch.tensor([0, 1, 2, 2, 5])
    features = class_embeddings[labels] * 3.0  # cosine is scale-free
    assert relationship_alignment_loss(features, labels, class_embeddings, 0.1).item() < 1e-6


def test_alignment_positive_when_relations_disagree_and_differentiable():
    # orthogonal classes, but all four features point the same way: V uniform, A peaked
    class_embeddings = torch.eye(NUM_CLASSES, EMBED_DIM).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3])
    features = (torch.ones(4, EMBED_DIM) + 0.1 * torch.randn(4, EMBED_DIM)).requires_grad_()
    loss = relationship_alignment_loss(features, labels, class_embeddings, 0.1)
    assert loss.item() > 0.1
    loss.backward()
    assert features.grad.abs().sum() > 0 and class_embeddings.grad.abs().sum() > 0


def test_relationship_kl_hand_computed():
    # two features at 90°; their classes at 0° -> V = I, A = all ones
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    class_embeddings = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1])
    tau = 0.5
    # row target p_A = (1/2, 1/2); row input p_V = softmax(1/τ, 0) and softmax(0, 1/τ)
    log_q_diag = 1.0 / tau - math.log(math.exp(1.0 / tau) + 1.0)
    log_q_off = -math.log(math.exp(1.0 / tau) + 1.0)
    row = 0.5 * (math.log(0.5) - log_q_diag) + 0.5 * (math.log(0.5) - log_q_off)
    expected = 2 * row / 4  # summed over both rows, divided by 4 elements
    assert relationship_kl(features, labels, features, labels, class_embeddings, tau).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_composed_alignment_is_mean_of_three_terms():
    class_embeddings = torch.randn(NUM_CLASSES, EMBED_DIM)
    seen, seen_labels = torch.randn(5, EMBED_DIM), torch.tensor([0, 1, 1, 2, 3])
    unseen, unseen_labels = torch.randn(2, EMBED_DIM), torch.tensor([4, 5])
    kwargs = dict(class_embeddings=class_embeddings, temperature=0.1)
    expected = (
        relationship_alignment_loss(seen, seen_labels, class_embeddings, 0.1)
        + relationship_alignment_loss(unseen, unseen_labels, class_embeddings, 0.1)
        + relationship_kl(seen, seen_labels, unseen, unseen_labels, class_embeddings, 0.1)
    ) / 3
    got = composed_alignment_loss(
        seen_features=seen, seen_labels=seen_labels, unseen_features=unseen, unseen_labels=unseen_labels, **kwargs
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    only_seen = composed_alignment_loss(
        seen_features=seen,
        seen_labels=seen_labels,
        unseen_features=unseen[:0],
        unseen_labels=unseen_labels[:0],
        **kwargs,
    )
    assert only_seen.item() == pytest.approx(
        relationship_alignment_loss(seen, seen_labels, class_embeddings, 0.1).item()
    )


# ---- disentanglement ---------------------------------------------------------------------


def test_disentangler_losses_finite_with_gradients_into_both_encoders():
    disentangler = Disentangler(EMBED_DIM)
    features = torch.randn(7, EMBED_DIM)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    class_embeddings = torch.randn(NUM_CLASSES, EMBED_DIM)
    related, unrelated = disentangler(features)
    assert related.shape == unrelated.shape == (7, EMBED_DIM)
    scores = disentangler.relation_scores(related, class_embeddings)
    assert scores.shape == (7, NUM_CLASSES) and ((scores > 0) & (scores < 1)).all()
    losses = [
        disentangler.reconstruction_loss(features, related, unrelated),
        unrelated_noise_loss(unrelated, 0.1),
        relation_loss(scores, labels),
    ]
    assert all(torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    assert disentangler.related_encoder[0].weight.grad.abs().sum() > 0
    assert disentangler.unrelated_encoder[0].weight.grad.abs().sum() > 0
    assert disentangler.decoder[0].weight.grad.abs().sum() > 0
    assert disentangler.relation_network.hidden.weight.grad.abs().sum() > 0


def test_relation_network_equals_linear_on_concatenation():
    disentangler = Disentangler(EMBED_DIM)
    network = disentangler.relation_network
    features, class_embeddings = torch.randn(3, EMBED_DIM), torch.randn(4, EMBED_DIM)
    pairs = torch.cat(
        [features.unsqueeze(1).expand(3, 4, EMBED_DIM), class_embeddings.unsqueeze(0).expand(3, 4, EMBED_DIM)], dim=2
    )
    expected = torch.sigmoid(network.score(torch.relu(network.hidden(pairs))).squeeze(-1))
    assert torch.allclose(network(features, class_embeddings), expected, atol=1e-6)


def test_unrelated_loss_zero_when_features_equal_noise():
    noise = torch.randn(4, EMBED_DIM)
    assert unrelated_noise_loss(noise.clone(), 0.1, noise=noise).item() == pytest.approx(0.0, abs=1e-6)
    assert unrelated_noise_loss(torch.zeros(4, EMBED_DIM), 0.1, noise=noise).item() > 0


# ---- chunked computation ----------------------------------------------------------------


def _explicit_relation(network, features, class_embeddings):
    """R on the explicit concatenation [h_i, ã_j] of every pair (the textbook form)."""
    n, m = features.shape[0], class_embeddings.shape[0]
    pairs = torch.cat([features.unsqueeze(1).expand(n, m, -1), class_embeddings.unsqueeze(0).expand(n, m, -1)], dim=2)
    return torch.sigmoid(network.score(torch.relu(network.hidden(pairs))).squeeze(-1))


@pytest.mark.parametrize("chunk_size", [1, 5, 12, None])
def test_chunked_relation_scores_and_gradients_equal_the_explicit_ones(chunk_size):
    network = Disentangler(EMBED_DIM).relation_network.double()
    features = torch.randn(4, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    classes = torch.randn(7, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 7, dtype=torch.float64)
    expected = _explicit_relation(network, features, classes)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [features, classes, *network.parameters()])
    got = network(features, classes, chunk_size)
    got_grads = torch.autograd.grad((got * weights).sum(), [features, classes, *network.parameters()])
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_relation_scores_pass_gradcheck_in_chunks():
    from pading.model.losses import _RelationScores

    torch.manual_seed(1)
    inputs = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(5, dtype=torch.float64, requires_grad=True),
              torch.randn(1, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b, w, c: _RelationScores.apply(a, b, w, c, 5), inputs)


@pytest.mark.parametrize("chunk_size", [1, 7, 40])
def test_chunked_mmd_and_alignment_equal_one_block(chunk_size):
    x = torch.randn(9, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, EMBED_DIM, dtype=torch.float64)
    class_embeddings = torch.randn(NUM_CLASSES, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (9,))
    for function in (lambda c: mmd_loss(x, y, SIGMAS_SQUARED, chunk_size=c),
                     lambda c: relationship_alignment_loss(x, labels, class_embeddings, 0.1, chunk_size=c)):
        whole = function(None)
        whole_grads = torch.autograd.grad(whole, [x, class_embeddings], allow_unused=True)
        chunked = function(chunk_size)
        chunked_grads = torch.autograd.grad(chunked, [x, class_embeddings], allow_unused=True)
        assert abs(float((chunked - whole).detach())) <= 1e-12 * abs(float(whole.detach()))
        for a, b in zip(chunked_grads, whole_grads):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-10, atol=1e-15)
