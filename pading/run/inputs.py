"""What the generator side of a run starts from, loaded one way for the generator stage, the
Tune search and the tables: the class table (optionally extended with
``vocabulary.extra_unseen``), the class-name embeddings, the pretrained segmenter's class
head and the extracted features (docs/architecture.md, "Data products")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from pading.classes import ClassTable
from pading.config import ExperimentConfig, SemanticsConfig
from pading.data.features import FeatureArrays, read_features
from pading.run.layout import RunLayout
from pading.run.readers import load_table


@dataclass(frozen=True)
class GeneratorInputs:
    """The inputs of generator training of one run.

    Attributes:
        table: the classes the generator and classifier train over.
        base_classes: how many of them the dataset has (the features' labels index these;
            classes from ``vocabulary.extra_unseen`` come after).
        encoder: the text encoder's id (recorded in the bundle).
        segmenter_dir: the pretrained segmenter.
        features_dir: the extracted features' shards.
        semantics_config: how the class names are encoded (:meth:`semantics`).
        cache_dir: where the encoded names are cached.
    """

    table: ClassTable
    base_classes: int
    encoder: str
    segmenter_dir: Path
    features_dir: Path
    semantics_config: SemanticsConfig
    cache_dir: Path

    def semantics(self) -> np.ndarray:
        """(C, S) float32 class-name embeddings in ``table`` order (encoded once, then read from
        the cache: at 20,000 names the first call takes about a minute on a CPU)."""
        from pading.model.semantics import class_embeddings

        return np.asarray(class_embeddings(self.table, self.semantics_config, cache_dir=self.cache_dir), np.float32)

    def class_head(self) -> nn.Module:
        """The pretrained segmenter's ``Linear(D, C+1)`` class head (the classifier's start),
        read without building the segmenter."""
        from pading.model.segmenter import Segmenter

        return Segmenter.load_class_head(self.segmenter_dir, map_location="cpu")

    def features(self) -> FeatureArrays:
        """Every extracted feature row (all shards)."""
        return read_features(self.features_dir)


def load_generator_inputs(config: ExperimentConfig, output: str | Path, *,
                          extend_vocabulary: bool = False) -> GeneratorInputs:
    """The :class:`GeneratorInputs` of the run in ``output`` (its prepare, pretrain and extract
    stages finished). ``extend_vocabulary``: append ``vocabulary.extra_unseen`` to the table
    (the generator stage does; the search and the tables score the dataset's classes)."""
    from pading.model.semantics import encoder_id
    from pading.vocabulary import extend_with_unseen

    layout = RunLayout(output)
    table = load_table(output)
    base_classes = table.num_classes
    if extend_vocabulary and config.vocabulary.extra_unseen:
        table = extend_with_unseen(table, config.vocabulary.extra_unseen)
    return GeneratorInputs(table=table, base_classes=base_classes, encoder=encoder_id(config.semantics),
                           segmenter_dir=layout.segmenter, features_dir=layout.features,
                           semantics_config=config.semantics, cache_dir=Path(config.semantics.cache_dir or layout.cache))
