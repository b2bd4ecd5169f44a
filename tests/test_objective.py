"""pading.training.objective: the total loss per variant, and the chunked objective equals the
textbook (dense) formulas of docs/method.md: the loss and every gradient, in float64, to < 1e-9."""

import pytest
import torch
import torch.nn.functional as F

from pading.config import LossConfig
from pading.errors import ConfigError
from pading.training.objective import LossInputs, PadingLoss

EMBED_DIM, NUM_CLASSES = 8, 9  # classes 0-5 seen, 6-8 unseen
SIGMAS_SQUARED = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
RELATIVE = 1e-9


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _problem(dtype=torch.float64, seen_candidates=None, unseen=(6, 7, 8)):
    """Leaves (the generator's outputs, class embeddings), a classifier, and ``make_inputs()``,
    which builds the loss inputs on a fresh graph from the same values."""
    rows = 10
    leaves = {
        "synthetic_seen": torch.randn(rows, EMBED_DIM, dtype=dtype, requires_grad=True),
        "synthetic_unseen": torch.randn(len(unseen), EMBED_DIM, dtype=dtype, requires_grad=True),
        "class_embeddings": torch.randn(NUM_CLASSES, EMBED_DIM, dtype=dtype, requires_grad=True),
    }
    classifier = torch.nn.Linear(EMBED_DIM, NUM_CLASSES + 1).to(dtype)
    labels = torch.randint(0, 6, (rows,))
    unseen = torch.tensor(unseen)
    real = torch.randn(rows, EMBED_DIM, dtype=dtype)
    noise_seen, noise_unseen = torch.randn(rows, EMBED_DIM, dtype=dtype), torch.randn(len(unseen), EMBED_DIM, dtype=dtype)

    def make_inputs():
        return LossInputs(
            real_seen=real, synthetic_seen=leaves["synthetic_seen"] * 1.0, seen_labels=labels, seen_positions=labels,
            synthetic_unseen=leaves["synthetic_unseen"] * 1.0, unseen_positions=unseen, unseen_candidates=unseen,
            class_embeddings=leaves["class_embeddings"] * 1.0, num_seen_total=rows, num_unseen_total=len(unseen),
            seen_candidates=seen_candidates, classify=classifier, unrelated_noise_seen=noise_seen,
            unrelated_noise_unseen=noise_unseen)

    return leaves, classifier, make_inputs


# ---- the textbook formulas ------------------------------------------------------------------------


def _mmd(x, y):
    def kernel(a, b, sigma_squared):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma_squared)).mean()

    return sum(kernel(x, x, s) + kernel(y, y, s) - 2 * kernel(x, y, s) for s in SIGMAS_SQUARED).sqrt()


def _kl(a_features, a_semantic, b_features, b_semantic, tau):
    visual = F.normalize(a_features, dim=1) @ F.normalize(b_features, dim=1).t() / tau
    semantic = F.normalize(a_semantic, dim=1) @ F.normalize(b_semantic, dim=1).t() / tau
    target = F.softmax(semantic, dim=1)
    return (target * (target.log() - F.log_softmax(visual, dim=1))).sum() / target.numel()


def _relation(network, h, classes):
    n, m = h.shape[0], classes.shape[0]
    pairs = torch.cat([h.unsqueeze(1).expand(n, m, -1), classes.unsqueeze(0).expand(n, m, -1)], dim=2)  # (n, m, 2D)
    return torch.sigmoid(network.score(torch.relu(network.hidden(pairs))).squeeze(-1))


def _dense_total(loss: PadingLoss, inputs: LossInputs) -> dict:
    """L = L_G + aux·L_cls + λ·[w1·(L_align + u·L_unrel) + w2·r·L_rel + w3·L_rec], term by term."""
    cfg, d = loss.config, loss.disentangler
    a = inputs.class_embeddings
    xs, xu, ys, yu = inputs.synthetic_seen, inputs.synthetic_unseen, inputs.seen_labels, inputs.unseen_positions
    terms = {"mmd": _mmd(xs, inputs.real_seen),
             "classification": F.cross_entropy(inputs.classify(xs), inputs.seen_labels)}
    groups = []
    hs, hu = xs, xu
    if d is not None:
        for x, labels, noise, candidates in ((xs, ys, inputs.unrelated_noise_seen, inputs.seen_candidates),
                                             (xu, yu, inputs.unrelated_noise_unseen, inputs.unseen_candidates)):
            h, u = d.related_encoder(x), d.unrelated_encoder(x)
            rec = (d.decoder(torch.cat([h, u], dim=1)) - x).abs().mean()
            target = F.softmax(noise / cfg.unrelated_temperature, dim=1)
            unrel = (target * (target.log() - F.log_softmax(u / cfg.unrelated_temperature, dim=1))).sum() / u.numel()
            candidates = torch.arange(a.shape[0]) if candidates is None else candidates
            targets = torch.tensor([int((candidates == y).nonzero()) for y in labels])
            rel = F.cross_entropy(_relation(d.relation_network, h, a[candidates]), targets)
            groups.append((h, rec, unrel, rel))
        hs, hu = groups[0][0], groups[1][0]
        for i, name in enumerate(("reconstruction", "unrelated", "relation"), start=1):
            terms[name] = (groups[0][i] + groups[1][i]) / 2
    tau = cfg.alignment_temperature
    terms["alignment"] = (_kl(hs, a[ys], hs, a[ys], tau) + _kl(hu, a[yu], hu, a[yu], tau)
                          + _kl(hs, a[ys], hu, a[yu], tau)) / 3
    regulariser = cfg.alignment_weight * terms["alignment"]
    if d is not None:
        regulariser = (cfg.alignment_weight * (terms["alignment"] + cfg.unrelated_weight * terms["unrelated"])
                       + cfg.relation_weight * cfg.relation_scale * terms["relation"]
                       + cfg.reconstruction_weight * terms["reconstruction"])
    terms["total"] = terms["mmd"] + cfg.auxiliary_classification_weight * terms["classification"] \
        + cfg.disentangle_weight * regulariser
    return terms


def _gradients(loss, leaves, classifier):
    tensors = list(leaves.values()) + list(loss.parameters()) + list(classifier.parameters())
    return [t.grad.clone() if t.grad is not None else None for t in tensors]


def _clear(loss, leaves, classifier):
    for t in list(leaves.values()) + list(loss.parameters()) + list(classifier.parameters()):
        t.grad = None


@pytest.mark.parametrize("variant", ["alignment", "full"])
@pytest.mark.parametrize("chunk_size", [1, 3, 17, 65536])
@pytest.mark.parametrize("sampled", [False, True], ids=["every-class", "sampled-candidates"])
def test_chunked_objective_equals_the_dense_formulas_in_float64(variant, chunk_size, sampled):
    config = LossConfig(variant=variant, disentangler_dropout=0.0, disentangle_weight=0.7, chunk_size=chunk_size,
                        auxiliary_classification_weight=0.3)
    loss = PadingLoss(config, EMBED_DIM).double()
    candidates = torch.tensor([0, 1, 2, 3, 4, 5, 7]) if sampled else None
    leaves, classifier, make_inputs = _problem(seen_candidates=candidates)
    expected = _dense_total(loss, make_inputs())
    expected["total"].backward()
    expected_grads = _gradients(loss, leaves, classifier)
    _clear(loss, leaves, classifier)
    result = loss(make_inputs())
    result.backward()
    got_grads = _gradients(loss, leaves, classifier)
    for name in ("mmd", "classification", "alignment", "total") + (
            ("unrelated", "relation", "reconstruction") if variant == "full" else ()):
        want = float(expected[name].detach())
        assert abs(result.terms[name] - want) <= RELATIVE * abs(want), name
    assert len(got_grads) == len(expected_grads)
    for got, want in zip(got_grads, expected_grads):
        if want is None:
            assert got is None or float(got.abs().max()) == 0.0
            continue
        scale = float(want.abs().max())
        assert scale > 0 and float((got - want).abs().max()) <= RELATIVE * scale


@pytest.mark.parametrize("variant", ["gmmn", "primitive"])
def test_mmd_only_variants_have_no_lambda_terms(variant):
    loss = PadingLoss(LossConfig(variant=variant), EMBED_DIM)
    assert loss.disentangler is None
    leaves, classifier, make_inputs = _problem(dtype=torch.float32)
    inputs = make_inputs()
    result = loss(inputs)
    for name in ("alignment", "unrelated", "relation", "reconstruction"):
        assert result.terms[name] == 0.0
    expected = _mmd(inputs.synthetic_seen, inputs.real_seen) + 0.001 * F.cross_entropy(
        classifier(inputs.synthetic_seen), inputs.seen_labels)
    assert result.terms["total"] == pytest.approx(float(expected.detach()), rel=1e-5)
    result.backward()
    assert leaves["synthetic_seen"].grad.abs().sum() > 0
    assert leaves["synthetic_unseen"].grad is None  # no unseen term in these variants


def test_full_variant_trains_both_encoders_and_the_unseen_samples():
    loss = PadingLoss(LossConfig(variant="full", disentangle_weight=0.5), EMBED_DIM)
    leaves, _, make_inputs = _problem(dtype=torch.float32)
    result = loss(make_inputs())
    for name in ("alignment", "unrelated", "relation", "reconstruction"):
        assert result.terms[name] > 0
    result.backward()
    assert leaves["synthetic_unseen"].grad.abs().sum() > 0
    assert loss.disentangler.related_encoder[0].weight.grad.abs().sum() > 0
    assert loss.disentangler.unrelated_encoder[0].weight.grad.abs().sum() > 0
    assert loss.disentangler.relation_network.hidden.weight.grad.abs().sum() > 0


def test_a_relation_candidate_set_without_the_true_class_is_an_error():
    from pading.errors import DataError

    loss = PadingLoss(LossConfig(variant="full"), EMBED_DIM)
    _, _, make_inputs = _problem(dtype=torch.float32, seen_candidates=torch.tensor([0, 7, 8]))
    with pytest.raises(DataError, match="relation candidates"):
        loss(make_inputs())


def test_bad_loss_settings_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="projection"):
        PadingLoss(LossConfig(variant="projection"), EMBED_DIM)
    with pytest.raises(ConfigError, match="alignment_seen_features"):
        PadingLoss(LossConfig(alignment_seen_features="both"), EMBED_DIM)
    with pytest.raises(ConfigError, match="losses.chunk_size"):
        LossConfig(chunk_size=-1)
    with pytest.raises(ConfigError, match="relation_class_sample"):
        LossConfig(relation_class_sample=1)
    with pytest.raises(ConfigError, match="unseen_class_sample"):
        LossConfig(unseen_class_sample=-3)
