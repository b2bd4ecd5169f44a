"""A tiny, untrained model bundle for the serving tests: built in a second, no training.

The semantics come from a vector file (encoder ``file``) so that no sentence model is
loaded; the file also holds vectors for :data:`EXTRA_NAMES`, names the tests add at run
time. Post-processing thresholds are zero and the "no object" logit is pushed down, so
even a random segmenter returns panoptic segments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pading.bundle import Bundle
from pading.config import tiny_config
from pading.data.synthetic import synthetic_table
from pading.model.classifier import Classifier, ProjectionClassifier
from pading.model.generator import build_generator
from pading.model.segmenter import Segmenter
from pading.model.semantics import class_embeddings, encoder_id

EXTRA_NAMES = ("zebra crossing", "teapot", "lamp post", "kite surfer")
SEMANTIC_DIM = 16
NUM_REFERENCE = 96
NO_OBJECT_BIAS = -8.0  # makes every query pick a class, so a random model still yields segments


def write_vector_file(path: Path, names, *, dim: int = SEMANTIC_DIM, seed: int = 0) -> Path:
    """``name v1 .. vD`` lines with seeded random vectors, one per name."""
    rng = np.random.default_rng(seed)
    lines = [f"{name} " + " ".join(f"{v:.6f}" for v in rng.standard_normal(dim)) for name in names]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tiny_bundle(directory: str | Path, *, projection: bool = False, seed: int = 0, **config_sections) -> Bundle:
    """Build, save under ``directory`` and return a tiny bundle over the synthetic vocabulary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = synthetic_table()
    vectors = write_vector_file(directory.parent / f"{directory.name}-vectors.txt", list(table.texts) + list(EXTRA_NAMES))
    sections = {
        "semantics": {"encoder": "file", "file": str(vectors.resolve())},
        "inference": {"object_mask_threshold": 0.0, "overlap_threshold": 0.0, "instance_top_k": 10},
        "serve": {"fit_steps": 30, "fit_per_class": 8, "fit_batch_size": 64},
        "losses": {"variant": "projection" if projection else "full"},
    }
    for key, value in config_sections.items():
        sections[key] = {**sections.get(key, {}), **value}
    config = tiny_config(**sections)
    semantics = class_embeddings(table, config.semantics)  # (C, S)
    torch.manual_seed(seed)
    segmenter = Segmenter(config.segmenter, table.num_classes).eval()
    embed_dim = config.segmenter.hidden_dim
    if projection:
        classifier, generator = ProjectionClassifier(embed_dim, torch.as_tensor(semantics)), None
    else:
        classifier = Classifier.from_class_head(segmenter.class_head)
        with torch.no_grad():
            classifier.linear.bias[-1] = NO_OBJECT_BIAS
        generator = build_generator(config.generator, semantics.shape[1], embed_dim).eval()
    rng = np.random.default_rng(seed)
    reference_embeddings = rng.standard_normal((NUM_REFERENCE, embed_dim)).astype(np.float32)
    reference_labels = rng.choice(table.seen_indices + [table.no_object_index], size=NUM_REFERENCE).astype(np.int64)
    bundle = Bundle(config, table, semantics, encoder_id(config.semantics), segmenter, classifier.eval(), generator,
                    config.generator, reference_embeddings, reference_labels)
    bundle.save(directory)
    return bundle
