"""Typed experiment configuration.

Every setting has one default, here. YAML files, ``--set section.key=value`` and the
overrides of Tune trials and tables rows all go through :func:`apply_overrides`, so they
are validated the same way: unknown keys, wrongly typed values, choices outside a field's
``Literal`` and out-of-range numbers are errors that name the key, raised at load time.

Configs are plain dataclasses (validation in ``__post_init__``, as litgpt does): picklable,
cheap to send to Ray workers, ``asdict``-able for MLflow params. pydantic would also do the
coercion, but the library must not depend on what Ray Serve happens to install, and the
~100 lines below (``_coerce``) are all the coercion the configs need.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from pading.errors import ConfigError

ABLATION_VARIANTS = ("projection", "gmmn", "primitive", "alignment", "full")


_SECTION_NAMES = {"DataConfig": "data", "SyntheticConfig": "data.synthetic", "SemanticsConfig": "semantics",
                  "SegmenterConfig": "segmenter", "PretrainConfig": "pretrain", "GeneratorConfig": "generator",
                  "LossConfig": "losses", "GeneratorTrainingConfig": "generator_training", "InferenceConfig": "inference",
                  "RayConfig": "ray", "TrackingConfig": "tracking", "ServeConfig": "serve", "TuneConfig": "tune",
                  "TablesConfig": "tables", "VocabularyConfig": "vocabulary", "SegmentConfig": "segment",
                  "ExperimentConfig": "config"}


def _check_choices(obj: Any) -> None:
    """Every ``Literal`` field of a config dataclass holds one of its choices."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(tp) is Literal and getattr(obj, name) not in typing.get_args(tp):
            section = _SECTION_NAMES.get(type(obj).__name__, type(obj).__name__)
            raise ConfigError(f"{section}.{name} must be one of {', '.join(map(str, typing.get_args(tp)))}, "
                              f"not {getattr(obj, name)!r}")


def config_section(cls: type) -> type:
    """``@dataclass`` whose ``__post_init__`` first checks the ``Literal`` choices, so a config
    built in code is validated like one loaded from YAML."""
    cls = dataclass(cls)
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        _check_choices(self)
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return cls



def default_datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (detectron2's convention), default ``./datasets``."""
    return os.environ.get("DETECTRON2_DATASETS", "./datasets")


@config_section
class SyntheticConfig:
    """The embedded default dataset (see pading.data.synthetic)."""

    # Training images written (prepare then applies data.unseen_in_train to those showing an unseen class).
    num_train: int = 240
    # Validation images written (a share of them is made to show an unseen class).
    num_val: int = 60
    # Side of the square images, in pixels.
    image_size: int = 64
    # Seed of the generated images and annotations (the same seed writes the same dataset).
    seed: int = 0
    # Zero-shot split naming the unseen classes of the COCO-format dataset (the LVIS writer does not use it).
    split: str = "zsp_coco_panoptic_14"

    def __post_init__(self):
        if self.num_train < 1 or self.num_val < 1:
            raise ConfigError("synthetic.num_train and num_val must be >= 1")
        if self.image_size < 32:
            raise ConfigError("synthetic.image_size must be >= 32")


@config_section
class DataConfig:
    """Where the data is and what form it has.

    ``root`` is a COCO-2017-layout directory (detectron2's ``datasets/coco``). Relative
    paths below are relative to ``root``. ``format`` picks the annotation the training
    targets come from: ``panoptic`` (the universal setting), ``instances`` (ZSI),
    ``semantic`` (ZSS, COCO-Stuff label PNGs) or ``lvis`` (LVIS v1 instances over the COCO
    images, open-vocabulary instance segmentation; docs/lvis.md).

    ``unseen_in_train``: what prepare does with a training image that shows an unseen class:
    ``drop_images`` (docs/method.md "Setting", the default) or ``drop_annotations`` (keep the
    image, remove the unseen instances: the open-vocabulary LVIS protocol, docs/lvis.md).
    """

    # COCO-2017-layout dataset directory; default $DETECTRON2_DATASETS/coco (./datasets/coco).
    root: str = field(default_factory=lambda: str(Path(default_datasets_root()) / "coco"))
    # Annotations the training targets come from: panoptic (ZSP), instances (ZSI), semantic (ZSS) or lvis.
    format: Literal["panoptic", "instances", "semantic", "lvis"] = "panoptic"
    # Zero-shot split naming the seen and unseen classes (pading/resources/zero_shot_splits.json).
    split: str = "zsp_coco_panoptic_14"
    # Directory of the training images.
    train_images: str = "train2017"
    # Directory of the validation images.
    val_images: str = "val2017"
    # COCO panoptic JSON of the training images (format panoptic).
    train_panoptic_json: str = "annotations/panoptic_train2017.json"
    # Directory of the training panoptic PNGs (format panoptic).
    train_panoptic_dir: str = "panoptic_train2017"
    # COCO panoptic JSON of the validation images (format panoptic; the evaluation's ground truth).
    val_panoptic_json: str = "annotations/panoptic_val2017.json"
    # Directory of the validation panoptic PNGs (format panoptic; the evaluation's ground truth).
    val_panoptic_dir: str = "panoptic_val2017"
    # COCO instances JSON of the training images (format instances).
    train_instances_json: str = "annotations/instances_train2017.json"
    # COCO instances JSON of the validation images (format instances; the evaluation's ground truth).
    val_instances_json: str = "annotations/instances_val2017.json"
    # LVIS v1 training JSON (format lvis): detectron2's datasets/lvis/ beside datasets/coco/ (relative to root,
    # like the rest).
    train_lvis_json: str = "../lvis/lvis_v1_train.json"
    # LVIS v1 validation JSON (format lvis; the evaluation's ground truth), beside datasets/coco/ as above.
    val_lvis_json: str = "../lvis/lvis_v1_val.json"
    # What prepare does with a training image showing an unseen class: drop_images or drop_annotations (above).
    unseen_in_train: Literal["drop_images", "drop_annotations"] = "drop_images"
    # Directory of the COCO-Stuff training label PNGs (format semantic).
    train_semantic_dir: str = "stuffthingmaps/train2017"
    # Directory of the COCO-Stuff validation label PNGs (format semantic; the evaluation's ground truth).
    val_semantic_dir: str = "stuffthingmaps/val2017"
    # Segmenter input side S in pixels: long side resized to S, padded to S x S (the COCO configs use 1024).
    image_size: int = 64
    # Keep only the first N training images (by image_id); None = all.
    max_train_images: Optional[int] = None
    # Keep only the first N validation images (by image_id); None = all.
    max_val_images: Optional[int] = None
    # Write this synthetic dataset at root when it is not there yet (pipelines put a relative root under the
    # output directory); None = use the data already at root.
    synthetic: Optional[SyntheticConfig] = None

    def __post_init__(self):
        if self.image_size < 16:
            raise ConfigError("data.image_size must be >= 16")

    def instances_json(self, split: str) -> str:
        """The instance annotation file of ``split`` ("train" / "val") for this format: the
        LVIS JSON for ``lvis``, else COCO's ``instances_*.json`` (relative to ``root``)."""
        if self.format == "lvis":
            return self.train_lvis_json if split == "train" else self.val_lvis_json
        return self.train_instances_json if split == "train" else self.val_instances_json


@config_section
class SemanticsConfig:
    """Text encoder for class names (pading.model.semantics)."""

    # Class-name encoder: minilm (shipped in a wheel, the offline default), clip (the paper's CLIP text
    # encoder with a prompt ensemble, needs clip_weights) or file (vectors read from `file`).
    encoder: Literal["minilm", "clip", "file"] = "minilm"
    # open_clip model name of encoder=clip (the paper's ViT-B/16).
    clip_model: str = "ViT-B-16"
    # Local path to open_clip weights (encoder=clip; nothing is downloaded).
    clip_weights: Optional[str] = None
    # .npy (with a .names.txt sidecar) or text file of vectors for encoder=file.
    file: Optional[str] = None
    # Where class-name embeddings are cached (semantics-<hash>.npy); None: the pipelines use <output>/cache.
    cache_dir: Optional[str] = None



#: The sizes of each ``segmenter.preset``; a SegmenterConfig fills the size fields left
#: unset (None) from its preset, so explicit keys win.
SEGMENTER_PRESETS: dict[str, dict] = {
    "r50": {  # the paper's ResNet-50 Mask2Former
        "num_queries": 100,
        "hidden_dim": 256,
        "decoder_layers": 10,
        "encoder_layers": 6,
        "feedforward_dim": 2048,
        "mask_feature_size": 256,
        "num_heads": 8,
        "backbone_depths": (3, 4, 6, 3),
        "backbone_hidden_sizes": (256, 512, 1024, 2048),
        "backbone_embedding_size": 64,
        "train_num_points": 12544,
    },
    "tiny": {  # tests and the demo
        "num_queries": 16,
        "hidden_dim": 64,
        "decoder_layers": 4,
        "encoder_layers": 1,
        "feedforward_dim": 128,
        "mask_feature_size": 64,
        "num_heads": 4,
        "backbone_depths": (1, 1, 1, 1),
        "backbone_hidden_sizes": (16, 32, 64, 128),
        "backbone_embedding_size": 16,
        "train_num_points": 1024,
    },
}


@config_section
class SegmenterConfig:
    """Mask2Former (transformers) settings. ``preset`` fills in the sizes left unset; explicit
    keys win: ``SegmenterConfig(preset="tiny", num_queries=32)`` is the tiny model with 32 queries."""

    # Sizes of the unset fields below (SEGMENTER_PRESETS): r50 (the paper's ResNet-50 Mask2Former) or tiny.
    preset: Literal["r50", "tiny"] = "r50"
    # Object queries Q per image (r50: 100).
    num_queries: Optional[int] = None
    # Query embedding size D, the size the generator produces (r50: 256).
    hidden_dim: Optional[int] = None
    # Transformer decoder layers, counting transformers' learnable-query layer (r50: 10; >= 2).
    decoder_layers: Optional[int] = None
    # Deformable-attention layers of the pixel decoder's encoder (r50: 6).
    encoder_layers: Optional[int] = None
    # FFN width of the transformer decoder layers (r50: 2048).
    feedforward_dim: Optional[int] = None
    # Pixel-decoder (deformable encoder) FFN width; None -> feedforward_dim // 2 (1024 for r50,
    # Mask2Former's value).
    encoder_feedforward_dim: Optional[int] = None
    # Channels of the pixel decoder's features and mask embeddings (r50: 256; a multiple of 32).
    mask_feature_size: Optional[int] = None
    # Attention heads of the pixel decoder and the transformer decoder (r50: 8; must divide hidden_dim).
    num_heads: Optional[int] = None
    # Bottleneck blocks in each of the four ResNet stages (r50: 3, 4, 6, 3).
    backbone_depths: Optional[tuple] = None
    # Output channels of the four ResNet stages (r50: 256, 512, 1024, 2048).
    backbone_hidden_sizes: Optional[tuple] = None
    # Channels of the ResNet stem (r50: 64).
    backbone_embedding_size: Optional[int] = None
    # Local save_pretrained dir / checkpoint of the backbone (not used when `weights` is set).
    backbone_weights: Optional[str] = None
    # Local save_pretrained dir of a whole Mask2Former; None (and no backbone_weights): random initialisation.
    weights: Optional[str] = None
    # Points sampled per mask for the mask and dice losses and the matching cost (r50: 12544 = 112 x 112).
    train_num_points: Optional[int] = None
    # Weight of the classification cross-entropy, in the loss and the Hungarian matching cost.
    class_weight: float = 2.0
    # Weight of the sigmoid cross-entropy mask loss, in the loss and the matching cost.
    mask_weight: float = 5.0
    # Weight of the dice mask loss, in the loss and the matching cost.
    dice_weight: float = 5.0
    # Cross-entropy weight of the "no object" class in the segmenter's loss (Mask2Former's eos_coef).
    no_object_weight: float = 0.1

    def __post_init__(self):
        for key, value in SEGMENTER_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.backbone_depths = tuple(self.backbone_depths)
        self.backbone_hidden_sizes = tuple(self.backbone_hidden_sizes)
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"segmenter.num_heads={self.num_heads} must divide hidden_dim={self.hidden_dim}")
        if min(self.num_queries, self.decoder_layers, self.train_num_points) < 1:
            raise ConfigError("segmenter.num_queries, decoder_layers and train_num_points must be >= 1")


@config_section
class PretrainConfig:
    """Stage 1: segmenter pretraining on the seen-only set."""

    # Optimiser steps of the segmenter pretraining.
    iterations: int = 140000
    # Images per step, over all workers (the global batch).
    batch_size: int = 16
    # Micro-batches per worker and step whose gradients are averaged: batch_size is split into
    # num_workers x grad_accumulation equal micro-batches (it must divide evenly).
    grad_accumulation: int = 1
    # AdamW learning rate after the warm-up (the paper's 1e-4).
    lr: float = 1e-4
    # Mask2Former's schedule: linear warm-up, then lr * (1 - step / iterations) ** lr_power ("poly");
    # "constant" keeps lr.
    lr_schedule: Literal["poly", "constant"] = "poly"
    # Exponent of the poly schedule.
    lr_power: float = 0.9
    # Steps of linear warm-up to lr (0 = none).
    warmup_steps: int = 10
    # AdamW weight decay (the paper's 0.05); none on norms and biases.
    weight_decay: float = 0.05
    # Largest L2 norm of all gradients together before a step (clip_grad_norm_); 0 = no clipping.
    grad_clip: float = 0.01
    # Exponential moving average of the weights (0 = off, the paper's setting): the stage saves
    # the average, not the last step's weights (pading.training.pretrain.WeightAverage).
    ema_decay: float = 0.0
    # Steps between checkpoints of pipelines/pretrain.py (the last step is always saved).
    checkpoint_every: int = 5000
    # Steps between loss log lines of pipelines/pretrain.py.
    log_every: int = 50
    # MB of decoded images and targets each worker keeps for later epochs (0 = decode every time).
    decoded_cache_mb: int = 512

    def __post_init__(self):
        if self.decoded_cache_mb < 0:
            raise ConfigError(f"pretrain.decoded_cache_mb must be >= 0, got {self.decoded_cache_mb}")
        if self.iterations < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ConfigError("pretrain.iterations, batch_size and grad_accumulation must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("pretrain.lr must be > 0 and pretrain.warmup_steps >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}")


@config_section
class GeneratorConfig:
    """The feature generator (pading.model.generator)."""

    # primitive (PADing's primitive generator) or gmmn (the MLP baseline); losses.variant gmmn/primitive force it.
    kind: Literal["primitive", "gmmn"] = "primitive"
    # Primitives K in the learned bank P (the paper's 400).
    num_primitives: int = 400
    # Decoder layers L of the primitive generator (the paper's 3).
    num_layers: int = 3
    # Attention heads of each primitive-generator layer (the paper's 8; must divide segmenter.hidden_dim).
    num_heads: int = 8
    # FFN width of each primitive-generator layer (the paper's 1024).
    feedforward_dim: int = 1024
    # Dropout of the primitive generator's attention and FFN (the paper's 0.1).
    dropout: float = 0.1
    # Std σ of the noise z: added in each primitive-generator layer, concatenated to a_c by the GMMN.
    noise_std: float = 1.0
    # Hidden width of the GMMN baseline's MLP.
    gmmn_hidden_dim: int = 512
    # Dropout of the GMMN baseline's hidden layer.
    gmmn_dropout: float = 0.4

    def __post_init__(self):
        if self.num_primitives < 1 or self.num_layers < 1 or self.num_heads < 1:
            raise ConfigError("generator.num_primitives, num_layers and num_heads must be >= 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.gmmn_dropout < 1.0) or self.noise_std < 0:
            raise ConfigError("generator.dropout and gmmn_dropout must be in [0, 1), noise_std >= 0")


@config_section
class LossConfig:
    """Generator-side losses (docs/method.md "Losses") and the ablation variant.

    variant: projection (classifier = frozen text embeddings), gmmn, primitive
    (primitive generator, MMD only), alignment (+ relationship alignment on raw
    features), full (+ alignment and disentanglement, the paper's PADing).
    """

    # Ablation variant (above): projection, gmmn, primitive, alignment or full (the paper's PADing).
    variant: Literal["projection", "gmmn", "primitive", "alignment", "full"] = "full"
    # Gaussian kernel bandwidths σ² of the MMD loss L_G (the paper's 2, 5, 10, 20, 40, 80).
    mmd_sigmas_squared: tuple = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
    # Weight of L_cls, the classifier's cross-entropy on synthetic seen features (the paper's 0.001).
    auxiliary_classification_weight: float = 0.001
    # λ: weight of the alignment/disentanglement regulariser as a whole (the paper's 1e-4).
    disentangle_weight: float = 1e-4
    # w1: weight of L_align (+ unrelated_weight x L_unrel) inside the regulariser.
    alignment_weight: float = 1.0
    # w2: weight of the relation loss L_rel (times relation_scale) inside the regulariser.
    relation_weight: float = 1.0
    # w3: weight of the reconstruction loss L_rec inside the regulariser.
    reconstruction_weight: float = 0.5
    # Factor of L_unrel within the w1 term (0.5 in docs/method.md's L).
    unrelated_weight: float = 0.5
    # Factor of L_rel within the w2 term (0.2 in docs/method.md's L).
    relation_scale: float = 0.2
    # τ: softmax temperature of the relationship KL L_align (the paper's 0.1).
    alignment_temperature: float = 0.1
    # T: softmax temperature of L_unrel, the KL between noise and semantic-unrelated features (0.1).
    unrelated_temperature: float = 0.1
    # Seen features of the alignment/disentanglement terms: "synthetic" (default, docs/method.md) or "real".
    alignment_seen_features: Literal["synthetic", "real"] = "synthetic"
    # Dropout of E_r, E_u and D (the disentangler's encoders and decoder).
    disentangler_dropout: float = 0.1
    # (sample, class) pairs per block of the relation network, whose (pairs, D) hidden layer is recomputed in
    # the backward pass (about 4 x chunk_size x D floats alive); the alignment KL and the MMD kernels use
    # blocks D times larger. 0 = auto: 4,096 on a CPU (cache-sized), 2^20 on a GPU (docs/method.md).
    chunk_size: int = 0
    # Candidate classes of the seen samples' relation scores per step: the batch's own classes plus a fresh
    # uniform sample of the others, up to this many; 0 = every class (the paper's objective).
    relation_class_sample: int = 2048
    # Unseen classes per step whose synthetic samples the alignment and relation terms use (a fresh uniform
    # sample each step); 0 = every unseen class (the paper's objective).
    unseen_class_sample: int = 512

    def __post_init__(self):
        self.mmd_sigmas_squared = tuple(float(s) for s in self.mmd_sigmas_squared)
        if self.chunk_size < 0:
            raise ConfigError(f"losses.chunk_size must be >= 1 (pairs per block) or 0 (auto), got {self.chunk_size}")
        if self.relation_class_sample < 0 or self.unseen_class_sample < 0:
            raise ConfigError("losses.relation_class_sample and losses.unseen_class_sample must be >= 0 "
                              "(0 = every class)")
        if 0 < self.relation_class_sample < 2:
            raise ConfigError("losses.relation_class_sample must be 0 (every class) or >= 2: a relation "
                              "cross-entropy over one candidate learns nothing")
        if self.alignment_temperature <= 0 or self.unrelated_temperature <= 0:
            raise ConfigError("losses.alignment_temperature and unrelated_temperature must be > 0")
        if not self.mmd_sigmas_squared or min(self.mmd_sigmas_squared) <= 0:
            raise ConfigError("losses.mmd_sigmas_squared must be a non-empty list of positive numbers")
        if not 0.0 <= self.disentangler_dropout < 1.0:
            raise ConfigError("losses.disentangler_dropout must be in [0, 1)")


@config_section
class VocabularyConfig:
    """Class names beyond the dataset's own (pading.vocabulary, docs/lvis.md "Past LVIS")."""

    # Names added as unseen classes (no images) to the generator stage and the bundle: "imagenet21k" (the
    # ImageNet-21k synset names, shipped in the timm wheel) or a text file with one class name per line.
    extra_unseen: Optional[str] = None


@config_section
class GeneratorTrainingConfig:
    """Stages 3 and 4: generator and classifier optimisation."""

    # Training steps of stages 3-4; each takes a generator step (none for projection), then a classifier step.
    iterations: int = 20000
    # Images whose query embeddings make one step's batch (the paper's 12; rows = this x segmenter.num_queries).
    batch_images: int = 12
    # Adam learning rate of the generator side (G, W_p, P, E_r, E_u, D, R) (the paper's 5e-4).
    generator_lr: float = 5e-4
    # Fractions of `iterations` at which generator_lr is multiplied by lr_decay_factor (the paper's 70 %, 92.5 %).
    lr_decay_at: tuple = (0.7, 0.925)
    # Factor applied to generator_lr at each lr_decay_at step (the paper's 0.1).
    lr_decay_factor: float = 0.1
    # SGD learning rate of the classifier (the paper's 1e-3; also the Serve endpoint's re-fit).
    classifier_lr: float = 1e-3
    # SGD momentum of the classifier (the paper's 0.9).
    classifier_momentum: float = 0.9
    # SGD weight decay of the classifier (the paper's 5e-4).
    classifier_weight_decay: float = 5e-4
    # Unseen classes per classifier step whose synthetic samples join the real ones (the paper's 5; also re-fit).
    unseen_classes_per_step: int = 5
    # Synthetic samples per chosen unseen class and step: 1 is the authors' release; 0 draws the
    # batch's matched queries ÷ its matched classes (as many as a real class has on average).
    synthetic_per_unseen_class: int = 0
    # Cross-entropy weight of the seen classes in classifier retraining (the paper's 1).
    seen_class_weight: float = 1.0
    # Cross-entropy weight of "no object" in classifier retraining (the paper's 0.1).
    no_object_class_weight: float = 0.1
    # Cross-entropy weight of the unseen classes in classifier retraining (the paper's 5).
    unseen_class_weight: float = 5.0
    # Temperature of the projection baseline's cosine logits (pading.model.classifier.ProjectionClassifier).
    projection_temperature: float = 0.05
    # Steps between log lines of pipelines/train_generator.py.
    log_every: int = 100
    # Steps between checkpoints of pipelines/train_generator.py.
    checkpoint_every: int = 1000

    def __post_init__(self):
        self.lr_decay_at = tuple(float(x) for x in self.lr_decay_at)


@config_section
class InferenceConfig:
    """Mask2Former post-processing thresholds (docs/method.md "Inference")."""

    # Panoptic: a query is kept when its class is not "no object" and its score exceeds this (the paper's 0.8).
    object_mask_threshold: float = 0.8
    # Panoptic: a segment is dropped when its kept area / its own area (m_q >= mask_threshold) is below this.
    overlap_threshold: float = 0.8
    # Mask probability a pixel needs to belong to a query's mask (panoptic own area, instance masks).
    mask_threshold: float = 0.5
    # Instance: (query, thing class) pairs kept per image, by class probability (the paper's 100).
    instance_top_k: int = 100
    # Where extraction and evaluation run the segmenter's forward pass: auto (ONNX Runtime on CPU when it is
    # installed, its export matches torch on a probe batch and the actor has >= 1000 images to do, else torch),
    # onnxruntime (whatever the share, failing if it cannot), torch (docs/performance.md "The inference
    # runtime"). Training and GPU inference use torch.
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"


@config_section
class RayConfig:
    """Resources of the Ray stages; pipelines/ reads these (pading/ only ``extract_batch_size``,
    the extraction's batch size, in pading.run.extraction)."""

    # Ray Train workers of pretraining (and of the generator stage, see generator_workers).
    num_workers: int = 1
    # One GPU per Ray Train worker, NCCL instead of gloo between them.
    use_gpu: bool = False
    # CPUs per Ray Train worker and per extraction / evaluation actor.
    cpus_per_worker: float = 1.0
    # CPUs (and torch threads) per pretraining worker; None: cpus_per_worker. The tiny Mask2Former's
    # step gains from a second thread where the generator's small ops do not (docs/performance.md,
    # "Two threads"), so the embedded default gives pretraining 2 and the generator stage 1.
    pretrain_cpus_per_worker: Optional[float] = None
    # Seconds between Ray Train's polls of its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2):
    # a finished or failed worker group is noticed within this time; the variable, when set, wins.
    train_poll_s: float = 0.25
    # Actors of the extract and evaluate stages (prepare's validation uses up to twice as many).
    extract_concurrency: int = 1
    # GPUs per extraction / evaluation actor (0: CPU only).
    extract_gpus: float = 0.0
    # Extraction and evaluation with fewer images than this to segment run in the driver instead of an
    # actor when the run started its own Ray (no cluster) and asks for no GPU: an actor's start (a new
    # process importing torch and transformers, then the model) took longer than the demo's images
    # (docs/performance.md, "Small inputs in the driver"). 0: always actors.
    driver_max_images: int = 500
    # Images per segmenter forward pass when extracting or predicting (extract, evaluate, tune, tables).
    extract_batch_size: int = 8
    # Images per features Parquet file (the unit of idempotent work).
    extract_shard_size: int = 32
    # Restarts of a failed Ray Train run (pretrain, generator stage) before the stage fails.
    max_failures: int = 2
    # How Ray Train places its workers: PACK (fill a node first), SPREAD, STRICT_PACK (all on one node),
    # STRICT_SPREAD (one per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train workers of the generator stage. None: num_workers when a step has enough work to divide
    # (rows x classes x D >= 1e8, pading.training.distributed.worth_dividing), else one (docs/performance.md).
    generator_workers: Optional[int] = None
    # CPUs of the local Ray a run starts when it joins no cluster (None: every core).
    local_cpus: Optional[int] = None
    # Start Ray's dashboard with that local Ray (its address is logged). Off saves about 3 s of start-up
    # (configs/smoke.yaml, which the tests run many times); a cluster's dashboard is the cluster's own.
    local_dashboard: bool = True

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker < 0 or self.extract_concurrency < 1:
            raise ConfigError("ray.num_workers and ray.extract_concurrency must be >= 1, ray.cpus_per_worker >= 0")
        if self.pretrain_cpus_per_worker is not None and self.pretrain_cpus_per_worker <= 0:
            raise ConfigError(f"ray.pretrain_cpus_per_worker must be > 0 (or unset), got {self.pretrain_cpus_per_worker}")
        if self.driver_max_images < 0:
            raise ConfigError(f"ray.driver_max_images must be >= 0, got {self.driver_max_images}")
        if self.train_poll_s <= 0:
            raise ConfigError(f"ray.train_poll_s must be > 0, got {self.train_poll_s}")


@config_section
class TrackingConfig:
    """MLflow; ``MLFLOW_TRACKING_URI`` wins over ``tracking_uri``."""

    # MLflow store; default (set by the pipelines): sqlite:///<output>/mlruns/mlflow.db.
    tracking_uri: Optional[str] = None
    # MLflow experiment the runs are logged under.
    experiment: str = "pading"


@config_section
class ServeConfig:
    """The Ray Serve endpoint (pipelines/serve.py) and its library side (pading.serving.service).

    Network binding, batching, autoscaling and resources of the deployment, request
    limits, and the classifier re-fit used when classes are added at run time
    (``POST /v1/classes``).
    """

    # Bind address; 127.0.0.1 keeps the endpoint local.
    host: str = "127.0.0.1"
    # HTTP port of Serve's proxy.
    port: int = 8000
    # URL path the application is served under (must start with "/").
    route_prefix: str = "/"
    # What accepts HTTP in front of the deployments (docs/serving.md, "The proxy"): haproxy = Ray Serve's
    # HAProxy ingress and high-throughput mode (Ray >= 2.56; ray[serve] brings the binary on Linux), ray =
    # Serve's Python proxy; auto = haproxy when the endpoint starts its own one-machine Ray and finds the
    # binary, else ray.
    proxy: Literal["auto", "haproxy", "ray"] = "auto"
    # What takes HTTP behind the proxy (docs/serving.md, "Two deployments"): front = a CPU-less front deployment
    # that calls the model replicas and turns a replica lost mid-request into 503 + Retry-After; replica = the
    # model replicas themselves, about 4 ms less per request, a replica lost mid-request answers the proxy's 500.
    ingress: Literal["front", "replica"] = "front"
    # auto: batch on a GPU, run every request alone on CPU (measured faster there,
    # docs/serving.md "Load test"); on / off force it (true / false are accepted as on / off).
    batching: Literal["auto", "on", "off"] = "auto"
    # The replicas' segmenter runtime: auto, torch or onnxruntime, as inference.runtime.
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    # Most requests one batched forward pass takes (when batching is on).
    max_batch_size: int = 8
    # Seconds a batch waits for more requests before it runs (when batching is on).
    batch_wait_timeout_s: float = 0.01
    # Fewest model replicas the autoscaler keeps.
    min_replicas: int = 1
    # Most model replicas the autoscaler starts.
    max_replicas: int = 1
    # Requests in flight per replica the autoscaler aims at.
    target_ongoing_requests: float = 4.0
    # Requests a replica works on at once.
    max_ongoing_requests: int = 32
    # Backpressure: requests waiting for a replica beyond this many (per proxy) get 503 with
    # a Retry-After header at once instead of queueing without bound; -1 = no limit.
    max_queued_requests: int = 64
    # Retry-After (seconds) sent with those 503s and the endpoint's other busy answers.
    retry_after_s: float = 1.0
    # Seconds a segmentation request may take; one not answered in time gets 503 (Retry-After).
    request_timeout_s: float = 60.0
    # Seconds; Serve calls check_health (a forward pass) this often.
    health_check_period_s: float = 10.0
    # Seconds; a replica whose check takes longer is replaced (also the limit of the classes/vocabularies/info calls).
    health_check_timeout_s: float = 30.0
    # GPUs per model replica (> 0: the replica runs on CUDA when it has one).
    num_gpus: float = 0.0
    # CPUs per model replica (also its torch threads).
    num_cpus: float = 1.0
    # Most pixels (width x height) of an uploaded image; larger images are refused with 413.
    max_image_pixels: int = 16_000_000
    # Most bytes of a request body; larger bodies are refused with 413 while being read.
    max_body_bytes: int = 32 * 1024 * 1024
    # Class names one POST /v1/classes may add.
    max_new_classes: int = 64
    # Classifier re-fit SGD steps when classes are added.
    fit_steps: int = 100
    # Re-fit: synthetic embeddings per chosen class and step.
    fit_per_class: int = 16
    # Re-fit: real reference embeddings (from the bundle) per step.
    fit_batch_size: int = 512
    # Where vocabulary changes are kept (docs/serving.md, "Vocabularies"): a directory every replica's node
    # sees, or "mlflow" (the tracking server). None: "vocabularies" next to a bundle directory; for a bundle
    # from MLflow (runs:/, models:/), the tracking server when it is one (http/https), else
    # ~/.pading/vocabularies/<run id or model name/version>, which only one machine sees: set it on a cluster.
    vocabulary_store: Optional[str] = None
    # A replica checks the store for a newer version before answering when its last check is older than this
    # (0: before every request, so a client never gets an answer without a class it added).
    vocabulary_refresh_s: float = 0.0
    # Named vocabularies a replica keeps loaded (least recently used out).
    max_vocabularies_per_replica: int = 8
    # Every this many versions, the replica that committed the change also commits a snapshot of the whole
    # vocabulary, so a replica that starts replays the chain from the newest snapshot on (0: never; a
    # directory store only: the MLflow store replays from version 1).
    vocabulary_snapshot_every: int = 1000

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, got {self.port}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0 or self.max_ongoing_requests < 1:
            raise ConfigError("serve.max_ongoing_requests must be >= 1 and serve.max_queued_requests >= 1 "
                              f"(or -1, no limit); got {self.max_ongoing_requests}, {self.max_queued_requests}")
        if min(self.retry_after_s, self.request_timeout_s, self.health_check_period_s,
               self.health_check_timeout_s) <= 0:
            raise ConfigError("serve.retry_after_s, request_timeout_s, health_check_period_s and "
                              "health_check_timeout_s must be > 0")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError("serve.max_batch_size must be >= 1 and serve.batch_wait_timeout_s >= 0")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"serve.min_replicas ({self.min_replicas}) and max_replicas ({self.max_replicas}) must satisfy "
                "0 <= min_replicas <= max_replicas, max_replicas >= 1"
            )
        if self.max_image_pixels < 1 or self.max_body_bytes < 1 or self.max_new_classes < 1:
            raise ConfigError("serve.max_image_pixels, max_body_bytes and max_new_classes must be >= 1")
        if self.fit_steps < 0 or self.fit_per_class < 1 or self.fit_batch_size < 1:
            raise ConfigError("serve.fit_steps must be >= 0, fit_per_class and fit_batch_size >= 1")
        if self.vocabulary_refresh_s < 0 or self.max_vocabularies_per_replica < 1 or self.vocabulary_snapshot_every < 0:
            raise ConfigError("serve.vocabulary_refresh_s and vocabulary_snapshot_every must be >= 0, "
                              "serve.max_vocabularies_per_replica >= 1")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")


#: Sampling kinds of a ``tune.search_space`` entry (pipelines/tune.py maps them to Ray Tune domains).
SEARCH_SPACE_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


def _default_search_space() -> dict:
    return {
        "losses.disentangle_weight": {"loguniform": [1e-5, 1e-2]},  # λ
        "losses.alignment_temperature": {"loguniform": [0.03, 1.0]},  # τ
        "generator.num_primitives": {"choice": [100, 200, 300, 400, 500]},  # K
        "generator_training.generator_lr": {"loguniform": [1e-4, 2e-3]},
    }


@config_section
class TuneConfig:
    """The Ray Tune search (pipelines/tune.py, pading.run.search).

    ``protocol``: ``pseudo_unseen`` (default) scores on ``pseudo_unseen_count`` seen classes
    that play unseen (their features are withheld from training) and never reads real unseen
    classes; ``paper`` scores on the val images' real unseen classes (peeks; runs are tagged).
    ``search_space``: ``"section.key" -> {kind: args}`` with kind in :data:`SEARCH_SPACE_KINDS`
    (``loguniform``/``uniform``/``randint``: ``[low, high]``; ``choice``/``grid``: a list).
    ``max_iterations`` 0 means ``generator_training.iterations``.
    """

    # Trials sampled from search_space.
    num_samples: int = 16
    # Generator-training steps per trial; 0 = generator_training.iterations.
    max_iterations: int = 0
    # Steps between a trial's score reports (each with a checkpoint); ASHA decides on these.
    report_every: int = 200
    # Iterations a trial runs before ASHA may stop it.
    grace_period: int = 400
    # ASHA's reduction factor: about 1 in this many trials goes on at each rung.
    reduction_factor: int = 3
    # CPUs per trial (also its torch threads).
    cpus_per_trial: float = 1.0
    # GPUs per trial (> 0: the trial trains on CUDA when it has one).
    gpus_per_trial: float = 0.0
    # Trials running at once; 0: as many as the resources allow.
    max_concurrent_trials: int = 0
    # What trials are scored on: pseudo_unseen (default, never reads unseen labels) or paper (above).
    protocol: Literal["pseudo_unseen", "paper"] = "pseudo_unseen"
    # Seen classes that play unseen under the pseudo_unseen protocol.
    pseudo_unseen_count: int = 4
    # Share of the training images held out for scoring (pseudo_unseen), by a stable hash of image_id.
    holdout_fraction: float = 0.2
    # What is searched: "section.key" -> {kind: args} (above); default λ, τ, K and generator_lr.
    search_space: dict = field(default_factory=_default_search_space)
    # Retries of a crashed trial; a failed trial never stops the search.
    max_failures: int = 1

    def __post_init__(self):
        if self.num_samples < 1 or self.report_every < 1 or self.max_iterations < 0:
            raise ConfigError("tune.num_samples and tune.report_every must be >= 1, tune.max_iterations >= 0")
        if self.pseudo_unseen_count < 1 or not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError("tune.pseudo_unseen_count must be >= 1 and tune.holdout_fraction in (0, 1)")
        if self.reduction_factor < 2 or self.grace_period < 1:
            raise ConfigError("tune.reduction_factor must be >= 2 and tune.grace_period >= 1")
        if not isinstance(self.search_space, dict) or not self.search_space:
            raise ConfigError("tune.search_space must be a non-empty mapping of 'section.key' -> {kind: args}")
        for key, spec in self.search_space.items():
            where = f"tune.search_space[{key!r}]"
            if not isinstance(key, str) or key.count(".") != 1:
                raise ConfigError(f"{where}: keys are 'section.key', e.g. 'losses.disentangle_weight'")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_SPACE_KINDS:
                raise ConfigError(f"{where}: expected one of {{{', '.join(SEARCH_SPACE_KINDS)}: ...}}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, (list, tuple)) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
            if kind in ("loguniform", "uniform", "randint"):
                args = [_number(a) for a in args]
                self.search_space[key] = {kind: args}
                if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                    raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {args!r}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")


@config_section
class TablesConfig:
    """The paper's tables (pipelines/tables.py, pading.run.tables).

    Rows are the ablation ``variants`` at ``generator.num_primitives`` and the full method at
    each of ``primitive_counts``; every row is trained once per seed. ``iterations`` 0 means
    ``generator_training.iterations``.
    """

    # Seeds every row is trained with (the tables report mean and std over them).
    seeds: tuple = (0, 1, 2)
    # Ablation rows (losses.variant values), each at generator.num_primitives.
    variants: tuple = ("projection", "gmmn", "primitive", "alignment", "full")
    # Primitive counts K of the full method's rows.
    primitive_counts: tuple = (100, 200, 300, 400, 500)
    # Generator-training steps per row; 0 = generator_training.iterations.
    iterations: int = 0
    # CPUs per row x seed Ray task (also its torch threads).
    cpus_per_task: float = 1.0
    # GPUs per row x seed Ray task (> 0: the task runs on CUDA when it has one).
    gpus_per_task: float = 0.0
    # Synthetic embeddings per unseen class in the t-SNE figure.
    tsne_per_class: int = 60

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        self.variants = tuple(str(v) for v in self.variants)
        self.primitive_counts = tuple(int(k) for k in self.primitive_counts)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"tables.seeds must be distinct and non-empty, got {self.seeds}")
        unknown = [v for v in self.variants if v not in ABLATION_VARIANTS]
        if unknown:
            raise ConfigError(f"tables.variants: unknown {unknown} (allowed: {ABLATION_VARIANTS})")
        if any(k < 1 for k in self.primitive_counts):
            raise ConfigError(f"tables.primitive_counts must be >= 1, got {self.primitive_counts}")
        if self.iterations < 0 or self.tsne_per_class < 1:
            raise ConfigError("tables.iterations must be >= 0 and tables.tsne_per_class >= 1")


#: Output formats of pipelines/segment.py (pading.serving.batch).
SEGMENT_FORMATS = ("parquet", "coco-panoptic", "coco-instance", "semantic")


@config_section
class SegmentConfig:
    """Batch segmentation of image collections (pipelines/segment.py, pading.serving.batch).

    ``task`` None means the format's own task (parquet: panoptic). ``shard_size`` images
    make one results file, the unit of resumable work.
    """

    # Output: parquet (segments.parquet), coco-panoptic (PNGs + JSON), coco-instance (results JSON), semantic (PNGs).
    format: Literal["parquet", "coco-panoptic", "coco-instance", "semantic"] = "parquet"
    # Task to run: panoptic, instance, semantic or all; None: the format's own (parquet: panoptic).
    task: Optional[Literal["panoptic", "instance", "semantic", "all"]] = None
    # Images per results file, the unit of resumable work.
    shard_size: int = 64
    # Images per segmenter forward pass inside an actor.
    batch_size: int = 4
    # Actors holding the model.
    concurrency: int = 1
    # CPUs per actor (also its torch threads).
    num_cpus: float = 1.0
    # GPUs per actor.
    num_gpus: float = 0.0
    # Least score of a segment written; segments scoring lower are left out.
    min_score: float = 0.0
    # The column of paths in a Parquet/CSV input.
    input_column: str = "path"
    # Most bytes of an image file; larger files are rejected unread.
    max_image_bytes: int = 64 * 1024 * 1024
    # Most pixels (width x height) of an image; larger images are rejected before decoding the pixels.
    max_image_pixels: int = 40_000_000
    # Files one actor reads and decodes at once.
    read_threads: int = 8
    # The actors' segmenter runtime: auto, torch or onnxruntime, as inference.runtime.
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1 or self.concurrency < 1 or self.read_threads < 1:
            raise ConfigError("segment.shard_size, batch_size, concurrency and read_threads must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ConfigError("segment.num_cpus/num_gpus must be >= 0, max_image_bytes/max_image_pixels >= 1")


@config_section
class ExperimentConfig:
    # Run name: the MLflow run of pipelines/full.py and the prefix of the tune and tables runs.
    name: str = "pading"
    # Seed of initialisation, data order and sampling in the training stages, the search and the Serve re-fit.
    seed: int = 0
    # Directory of every stage's outputs (--output wins); the pipelines make it absolute.
    output_dir: str = "outputs/pading"
    # The dataset: where it is and what form it has.
    data: DataConfig = field(default_factory=DataConfig)
    # Text encoder of the class names.
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)
    # The Mask2Former segmenter's sizes, loss weights and weights files.
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    # Stage 1: segmenter pretraining on seen classes.
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # The feature generator.
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # Generator-side losses and the ablation variant.
    losses: LossConfig = field(default_factory=LossConfig)
    # Stages 3 and 4: generator and classifier optimisation.
    generator_training: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    # Extra unseen class names.
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    # Post-processing thresholds of the predictions.
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # Ray resources and placement of the pipelines.
    ray: RayConfig = field(default_factory=RayConfig)
    # MLflow store and experiment.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The Serve endpoint (pipelines/serve.py).
    serve: ServeConfig = field(default_factory=ServeConfig)
    # The Ray Tune search (pipelines/tune.py).
    tune: TuneConfig = field(default_factory=TuneConfig)
    # The paper's tables (pipelines/tables.py).
    tables: TablesConfig = field(default_factory=TablesConfig)
    # Batch segmentation (pipelines/segment.py).
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


#: Settings of where or how a run executes, not of what its stages compute: a stage finished
#: with other values of these is the same stage (:func:`computed_settings`).
RUNTIME_SECTIONS = ("name", "output_dir", "tracking.", "ray.", "serve.", "segment.", "tables.", "tune.")


def computed_settings(config: "ExperimentConfig") -> dict[str, Any]:
    """The settings of ``config`` that decide what its stages compute (:meth:`ExperimentConfig.flat`
    less :data:`RUNTIME_SECTIONS`): what a stage's success record keeps (pading.run.stage.Stage)."""
    return {key: value for key, value in config.flat().items() if not key.startswith(RUNTIME_SECTIONS)}


def setting_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"section.key: old -> new"`` for every setting whose value differs between two
    :meth:`ExperimentConfig.flat` dicts (a missing one is None), sorted by key."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


# ---- (de)serialisation ----------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class _Typed:
    """A ``--set`` value: the text as typed and YAML's reading of it. A field that holds text
    takes the text, so ``--set data.split=10:30`` is ``"10:30"``, not YAML 1.1's 630."""

    # The value as typed after "=" (surrounding blanks removed).
    text: str
    # What YAML reads it as (a number, bool, list, mapping, None or text).
    parsed: Any


def _wants_text(tp: Any, text: str) -> bool:
    """Whether a field of type ``tp`` takes ``text`` as typed (a string field; a choice of strings
    that ``text`` is one of, so YAML's ``false`` still means ``off``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(inner) == 1 and _wants_text(inner[0], text)
    if typing.get_origin(tp) is Literal:
        return text in typing.get_args(tp)
    return tp is str


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, _Typed):
        value = value.text if _wants_text(tp, value.text) else value.parsed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML reads on/off as booleans
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(value: Any) -> Any:
    """A number written as text YAML leaves a string (``1e-4``: YAML 1.1 wants ``1.0e-4``) as
    a float; anything else as it is."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


def _plain(value: Any) -> Any:
    """NumPy scalars (as Tune samples them) -> Python numbers."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"``: the one way an override is applied,
    for ``--set``, Tune trials and tables rows (unknown keys are caught by :func:`from_dict`)."""
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ConfigError(f"override {key!r} has an empty key")
    cursor = data
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
        if not isinstance(cursor, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a config section")
    cursor[parts[-1]] = _plain(value)


def parse_override(text: str) -> tuple[str, Any]:
    """``"generator.num_primitives=200"`` -> ``("generator.num_primitives", 200)``; the value is
    parsed as YAML (numbers, booleans, lists, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def apply_overrides(config: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """A new config with ``{"section.key": value}`` applied and validated like YAML (unknown
    keys and bad values raise :class:`~pading.errors.ConfigError`)."""
    data = to_dict(config)
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides
    (``"section.key=value"``) before validating, so e.g. ``segmenter.preset=tiny`` picks the
    tiny sizes."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    for item in overrides:
        key, value = parse_override(item)
        _refuse_switched_off(data, key, item)
        if isinstance(value, (bool, int, float)):  # what YAML may have read from text (10:30, 0x1F, yes)
            value = _Typed(item.split("=", 1)[1].split(" #", 1)[0].strip(), value)
        _set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def _refuse_switched_off(data: dict, key: str, item: str) -> None:
    """``--set data.synthetic.seed=3`` on a config whose ``data.synthetic`` is off (null)
    would switch the section on (and write a synthetic dataset at ``data.root``): refuse it,
    and say how to switch it on on purpose."""
    cls, cursor = ExperimentConfig, data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return  # an unknown key: from_dict names it
        tp = typing.get_type_hints(cls)[part]
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        value = cursor.get(part) if isinstance(cursor, dict) else None
        if type(None) in args and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            if value is None and fields[part].default is None:
                section = ".".join(parts[: depth + 1])
                rest = ".".join(parts[depth + 1:])
                raise ConfigError(
                    f"override {item!r}: {section} is off (null) in this config; to switch it on, set the "
                    f"section itself, e.g. --set '{section}={{{rest}: {item.split('=', 1)[1].strip()}}}'")
            tp = inner[0]
        cls, cursor = tp, value


def tiny_config(**sections: dict) -> ExperimentConfig:
    """A small config for tests and notebooks: tiny segmenter, short schedules.

    ``sections`` are merged like YAML, e.g. ``tiny_config(generator={"num_primitives": 8})``.
    """
    data = {
        "segmenter": {"preset": "tiny"},
        "pretrain": {"iterations": 2, "batch_size": 2, "checkpoint_every": 1, "log_every": 1},
        "generator": {"num_primitives": 8, "num_layers": 1, "num_heads": 4, "feedforward_dim": 64},
        "generator_training": {"iterations": 2, "batch_images": 2, "log_every": 1},
    }
    for section, values in sections.items():
        for key, value in values.items():
            _set_dotted(data, f"{section}.{key}", value)
    return from_dict(ExperimentConfig, data)


def save_config(config: ExperimentConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
