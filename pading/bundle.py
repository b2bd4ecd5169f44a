"""The model bundle: everything needed to segment seen and unseen classes, as one
directory (docs/architecture.md "Stages and their products"). Weights are safetensors; metadata is
JSON/YAML. Nothing is unpickled.

Layout (the names are the module's constants below; nothing else spells them)::

    bundle/
      config.yaml            CONFIG_FILE: the resolved experiment config
      classes.json           CLASSES_FILE: the class table (id, name, isthing, unseen, added)
      semantics.npy          SEMANTICS_FILE: (C, S) class semantic embeddings, table order
      semantics.json         SEMANTICS_META_FILE: {"encoder": ...}
      segmenter/             SEGMENTER_DIR: pading.model.segmenter.Segmenter.save(), less the
                             class head (the classifier replaces it)
      classifier.safetensors + classifier.json   CLASSIFIER_WEIGHTS_FILE, CLASSIFIER_META_FILE:
                                                 {"kind": "linear"|"projection", ...}
      generator.safetensors  + generator.json    GENERATOR_WEIGHTS_FILE, GENERATOR_META_FILE
                                                 (absent for the projection baseline)
      reference_features.safetensors             REFERENCE_FEATURES_FILE: a sample of real query
                                                 embeddings + labels (to re-fit the classifier
                                                 for run-time classes)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pading.classes import ClassTable
from pading.config import (
    ExperimentConfig,
    GeneratorConfig,
    from_dict,
    load_config,
    save_config,
)
from pading.errors import DataError
from pading.model.classifier import Classifier, ProjectionClassifier
from pading.model.generator import build_generator
from pading.model.segmenter import Segmenter, read_safetensors

logger = logging.getLogger(__name__)

# ---- the bundle's file names (the on-disk format; see the layout above) ------------------
CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
SEMANTICS_FILE = "semantics.npy"
SEMANTICS_META_FILE = "semantics.json"
SEGMENTER_DIR = "segmenter"
CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"
CLASSIFIER_META_FILE = "classifier.json"
GENERATOR_WEIGHTS_FILE = "generator.safetensors"
GENERATOR_META_FILE = "generator.json"
REFERENCE_FEATURES_FILE = "reference_features.safetensors"
#: What :meth:`Bundle.load` needs to find (the generator and reference features are optional).
REQUIRED_FILES = (CONFIG_FILE, CLASSES_FILE, SEMANTICS_FILE, SEGMENTER_DIR, CLASSIFIER_META_FILE)


@dataclass
class Bundle:
    """A trained universal zero-shot segmenter.

    Attributes:
        config: the experiment config it was trained with.
        table: its vocabulary (C classes).
        class_semantics: (C, S) float32 semantic embeddings, table order.
        encoder: the text encoder's id (``pading.model.semantics.encoder_id``).
        segmenter: the frozen Mask2Former; its class head is replaced by ``classifier``.
        classifier: (N, D) -> (N, C+1).
        generator: semantic (N, S) -> synthetic embeddings (N, D); None for the projection baseline.
        generator_config: the settings ``generator`` was built with.
        reference_embeddings: (N, D) float32 sample of real training query embeddings, or None.
        reference_labels: (N,) int64 their labels (``table.no_object_index`` = no object).
    """

    config: ExperimentConfig
    table: ClassTable
    class_semantics: np.ndarray
    encoder: str
    segmenter: Segmenter
    classifier: nn.Module
    generator: Optional[nn.Module] = None
    generator_config: Optional[GeneratorConfig] = None
    reference_embeddings: Optional[np.ndarray] = None
    reference_labels: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.class_semantics.shape[0] != self.table.num_classes:
            raise DataError("bundle", f"{self.class_semantics.shape[0]} semantic rows for {self.table.num_classes} classes")
        self.segmenter.replace_class_head(self.classifier, num_classes=self.table.num_classes)

    @property
    def device(self) -> torch.device:
        return next(self.segmenter.parameters()).device

    def to(self, device) -> "Bundle":
        self.segmenter.to(device)
        self.classifier.to(device)
        if self.generator is not None:
            self.generator.to(device)
        return self

    def with_classifier(self, table: ClassTable, class_semantics: np.ndarray, classifier: nn.Module) -> "Bundle":
        """A new bundle sharing segmenter weights and generator, with another vocabulary
        and classifier (run-time classes). The segmenter module is shallow-copied so the
        old bundle keeps serving with its own head until it is swapped out."""
        import copy

        segmenter = copy.copy(self.segmenter)  # shares parameters, own attribute dict
        segmenter._modules = dict(self.segmenter._modules)
        segmenter.mask2former = copy.copy(self.segmenter.mask2former)
        segmenter.mask2former._modules = dict(self.segmenter.mask2former._modules)
        return Bundle(
            config=self.config, table=table, class_semantics=np.asarray(class_semantics, np.float32),
            encoder=self.encoder, segmenter=segmenter, classifier=classifier, generator=self.generator,
            generator_config=self.generator_config, reference_embeddings=self.reference_embeddings,
            reference_labels=self._relabel_reference(table),
        )

    def _relabel_reference(self, table: ClassTable) -> Optional[np.ndarray]:
        """Reference labels re-indexed for ``table`` (same class names; no object moves to
        the end; classes absent from ``table`` become no object)."""
        if self.reference_labels is None:
            return None
        mapping = np.full(self.table.num_classes + 1, table.no_object_index, dtype=np.int64)
        for index, info in enumerate(self.table):
            try:
                mapping[index] = table.index_of_name(info.name)
            except KeyError:
                pass
        return mapping[self.reference_labels]

    # ---- persistence --------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        return write_bundle(directory, **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)})

    @staticmethod
    def read_table(directory: str | Path) -> ClassTable:
        """The class table of the bundle in ``directory``, without loading its models."""
        return ClassTable.from_records(json.loads((Path(directory) / CLASSES_FILE).read_text()))

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device | None = None) -> "Bundle":
        directory = Path(directory)
        for required in REQUIRED_FILES:
            if not (directory / required).exists():
                raise DataError(str(directory), f"not a model bundle: {required} is missing")
        device = torch.device(map_location) if map_location is not None else torch.device("cpu")
        config = load_config(directory / CONFIG_FILE)
        table = cls.read_table(directory)
        semantics = np.load(directory / SEMANTICS_FILE, allow_pickle=False)
        encoder = json.loads((directory / SEMANTICS_META_FILE).read_text())["encoder"]
        segmenter = Segmenter.load(directory / SEGMENTER_DIR, map_location=device)
        classifier = load_classifier(directory, device)
        generator, generator_config = None, None
        if (directory / GENERATOR_META_FILE).is_file():
            meta = json.loads((directory / GENERATOR_META_FILE).read_text())
            generator_config = from_dict(GeneratorConfig, meta["config"])
            generator = build_generator(generator_config, meta["semantic_dim"], meta["embed_dim"])
            generator.load_state_dict(read_safetensors(directory / GENERATOR_WEIGHTS_FILE, device))
            generator.to(device).eval()
        reference_embeddings = reference_labels = None
        if (directory / REFERENCE_FEATURES_FILE).is_file():
            reference = read_safetensors(directory / REFERENCE_FEATURES_FILE)
            reference_embeddings = reference["embeddings"].numpy()
            reference_labels = reference["labels"].numpy()
        return cls(config, table, semantics, encoder, segmenter.to(device).eval(), classifier, generator, generator_config,
                   reference_embeddings, reference_labels)


def write_bundle(
    directory: str | Path,
    *,
    config: ExperimentConfig,
    table: ClassTable,
    class_semantics: np.ndarray,
    encoder: str,
    segmenter: Segmenter | Path,
    classifier: nn.Module,
    generator: Optional[nn.Module] = None,
    generator_config: Optional[GeneratorConfig] = None,
    reference_embeddings: Optional[np.ndarray] = None,
    reference_labels: Optional[np.ndarray] = None,
) -> Path:
    """Write a bundle directory from :class:`Bundle`'s parts (:meth:`Bundle.save` is this).
    ``segmenter`` may also be the directory of a saved segmenter, written here as a bundle
    holds it (without its class head, which ``classifier`` replaces) without building it:
    the generator stage's worker needs only the pretrained class head, which
    :meth:`Segmenter.load_class_head` reads alone."""
    if class_semantics.shape[0] != table.num_classes:
        raise DataError("bundle", f"{class_semantics.shape[0]} semantic rows for {table.num_classes} classes")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(config, directory / CONFIG_FILE)
    (directory / CLASSES_FILE).write_text(json.dumps(table.to_records(), indent=1))
    np.save(directory / SEMANTICS_FILE, np.asarray(class_semantics, np.float32), allow_pickle=False)
    (directory / SEMANTICS_META_FILE).write_text(json.dumps({"encoder": encoder}))
    if isinstance(segmenter, Segmenter):
        segmenter.save(directory / SEGMENTER_DIR)
    else:
        Segmenter.save_without_class_head(segmenter, directory / SEGMENTER_DIR, table.num_classes)
    save_classifier(classifier, directory)
    if generator is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
        save_file(state, str(directory / GENERATOR_WEIGHTS_FILE))
        meta = {
            "config": dataclasses.asdict(generator_config or config.generator),
            "semantic_dim": int(class_semantics.shape[1]),
            "embed_dim": int(config.segmenter.hidden_dim),
        }
        (directory / GENERATOR_META_FILE).write_text(json.dumps(meta, indent=1))
    if reference_embeddings is not None and reference_labels is not None:
        save_file({"embeddings": torch.as_tensor(np.asarray(reference_embeddings, np.float32)),
                   "labels": torch.as_tensor(np.asarray(reference_labels, np.int64))},
                  str(directory / REFERENCE_FEATURES_FILE))
    logger.info("saved bundle to %s", directory)
    return directory


def save_classifier(classifier: nn.Module, directory: Path) -> None:
    if isinstance(classifier, ProjectionClassifier):
        meta = {"kind": "projection", "embed_dim": classifier.embed_dim, "num_classes": classifier.num_classes,
                "semantic_dim": classifier.semantic_dim, "temperature": classifier.temperature}
    elif isinstance(classifier, Classifier):
        meta = {"kind": "linear", "embed_dim": classifier.embed_dim, "num_classes": classifier.num_classes}
    else:
        raise DataError("classifier", f"cannot save a {type(classifier).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(directory / CLASSIFIER_WEIGHTS_FILE))
    (directory / CLASSIFIER_META_FILE).write_text(json.dumps(meta))


def load_classifier(directory: Path, device: torch.device) -> nn.Module:
    meta = json.loads((directory / CLASSIFIER_META_FILE).read_text())
    state = read_safetensors(directory / CLASSIFIER_WEIGHTS_FILE, device)
    if meta["kind"] == "projection":
        classifier = ProjectionClassifier(meta["embed_dim"], state["class_semantics"], temperature=meta["temperature"])
    elif meta["kind"] == "linear":
        classifier = Classifier(meta["embed_dim"], meta["num_classes"])
    else:
        raise DataError(str(directory / CLASSIFIER_META_FILE), f"unknown classifier kind {meta['kind']!r}")
    classifier.load_state_dict(state)
    return classifier.to(device).eval()
