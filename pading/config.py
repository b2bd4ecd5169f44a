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
                  "TablesConfig": "tables", "ExperimentConfig": "config"}


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

    num_train: int = 240
    num_val: int = 60
    image_size: int = 64
    seed: int = 0
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

    root: str = field(default_factory=lambda: str(Path(default_datasets_root()) / "coco"))
    format: Literal["panoptic", "instances", "semantic", "lvis"] = "panoptic"
    split: str = "zsp_coco_panoptic_14"
    train_images: str = "train2017"
    val_images: str = "val2017"
    train_panoptic_json: str = "annotations/panoptic_train2017.json"
    train_panoptic_dir: str = "panoptic_train2017"
    val_panoptic_json: str = "annotations/panoptic_val2017.json"
    val_panoptic_dir: str = "panoptic_val2017"
    train_instances_json: str = "annotations/instances_train2017.json"
    val_instances_json: str = "annotations/instances_val2017.json"
    # format lvis: detectron2's datasets/lvis/ beside datasets/coco/ (relative to root, like the rest)
    train_lvis_json: str = "../lvis/lvis_v1_train.json"
    val_lvis_json: str = "../lvis/lvis_v1_val.json"
    unseen_in_train: Literal["drop_images", "drop_annotations"] = "drop_images"
    train_semantic_dir: str = "stuffthingmaps/train2017"
    val_semantic_dir: str = "stuffthingmaps/val2017"
    image_size: int = 64
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
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

    encoder: Literal["minilm", "clip", "file"] = "minilm"
    clip_model: str = "ViT-B-16"
    clip_weights: Optional[str] = None  # local path to open_clip weights
    file: Optional[str] = None  # .npy or text file of vectors for encoder=file
    cache_dir: Optional[str] = None  # default: <output>/cache/semantics



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

    preset: Literal["r50", "tiny"] = "r50"
    num_queries: Optional[int] = None
    hidden_dim: Optional[int] = None
    decoder_layers: Optional[int] = None
    encoder_layers: Optional[int] = None
    feedforward_dim: Optional[int] = None
    # Pixel-decoder (deformable encoder) FFN width; None -> feedforward_dim // 2 (1024 for r50,
    # Mask2Former's value).
    encoder_feedforward_dim: Optional[int] = None
    mask_feature_size: Optional[int] = None
    num_heads: Optional[int] = None
    backbone_depths: Optional[tuple] = None
    backbone_hidden_sizes: Optional[tuple] = None
    backbone_embedding_size: Optional[int] = None
    backbone_weights: Optional[str] = None  # local save_pretrained dir / checkpoint of the backbone
    weights: Optional[str] = None  # local save_pretrained dir of a whole Mask2Former
    train_num_points: Optional[int] = None
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
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

    iterations: int = 140000
    batch_size: int = 16  # images per step, over all workers (the global batch)
    # Micro-batches per worker and step whose gradients are averaged: batch_size is split into
    # num_workers x grad_accumulation equal micro-batches (it must divide evenly).
    grad_accumulation: int = 1
    lr: float = 1e-4
    # Mask2Former's schedule: linear warm-up, then lr * (1 - step / iterations) ** lr_power ("poly");
    # "constant" keeps lr.
    lr_schedule: Literal["poly", "constant"] = "poly"
    lr_power: float = 0.9
    warmup_steps: int = 10
    weight_decay: float = 0.05
    grad_clip: float = 0.01
    # Exponential moving average of the weights (0 = off, the paper's setting): the stage saves
    # the average, not the last step's weights (pading.training.pretrain.WeightAverage).
    ema_decay: float = 0.0
    checkpoint_every: int = 5000
    log_every: int = 50

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ConfigError("pretrain.iterations, batch_size and grad_accumulation must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("pretrain.lr must be > 0 and pretrain.warmup_steps >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}")


@config_section
class GeneratorConfig:
    """The feature generator (pading.model.generator)."""

    kind: Literal["primitive", "gmmn"] = "primitive"
    num_primitives: int = 400
    num_layers: int = 3
    num_heads: int = 8
    feedforward_dim: int = 1024
    dropout: float = 0.1
    noise_std: float = 1.0
    gmmn_hidden_dim: int = 512
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

    variant: Literal["projection", "gmmn", "primitive", "alignment", "full"] = "full"
    mmd_sigmas_squared: tuple = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
    auxiliary_classification_weight: float = 0.001
    disentangle_weight: float = 1e-4  # λ
    alignment_weight: float = 1.0  # w1
    relation_weight: float = 1.0  # w2
    reconstruction_weight: float = 0.5  # w3
    unrelated_weight: float = 0.5
    relation_scale: float = 0.2
    alignment_temperature: float = 0.1  # τ
    unrelated_temperature: float = 0.1  # T
    # Seen features of the alignment/disentanglement terms: "synthetic" (default, docs/method.md) or "real".
    alignment_seen_features: Literal["synthetic", "real"] = "synthetic"
    disentangler_dropout: float = 0.1  # dropout of E_r, E_u and D
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

    iterations: int = 20000
    batch_images: int = 12
    generator_lr: float = 5e-4
    lr_decay_at: tuple = (0.7, 0.925)
    lr_decay_factor: float = 0.1
    classifier_lr: float = 1e-3
    classifier_momentum: float = 0.9
    classifier_weight_decay: float = 5e-4
    unseen_classes_per_step: int = 5
    # Synthetic samples per chosen unseen class and step: 1 is the authors' release; 0 draws the
    # batch's matched queries ÷ its matched classes (as many as a real class has on average).
    synthetic_per_unseen_class: int = 0
    seen_class_weight: float = 1.0
    no_object_class_weight: float = 0.1
    unseen_class_weight: float = 5.0
    # Temperature of the projection baseline's cosine logits (pading.model.classifier.ProjectionClassifier).
    projection_temperature: float = 0.05
    log_every: int = 100
    checkpoint_every: int = 1000

    def __post_init__(self):
        self.lr_decay_at = tuple(float(x) for x in self.lr_decay_at)


@config_section
class InferenceConfig:
    """Mask2Former post-processing thresholds (docs/method.md "Inference")."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5
    instance_top_k: int = 100


@config_section
class RayConfig:
    """Resources; pading never reads this, pipelines/ does."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    extract_concurrency: int = 1
    extract_gpus: float = 0.0
    extract_batch_size: int = 8
    extract_shard_size: int = 32  # images per features Parquet file (the unit of idempotent work)
    max_failures: int = 2
    # How Ray Train places its workers: PACK (fill a node first), SPREAD, STRICT_SPREAD (one per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train workers of the generator stage. None: num_workers when a step has enough work to divide
    # (rows x classes x D >= 1e8, pading.training.distributed.worth_dividing), else one (README "Performance").
    generator_workers: Optional[int] = None
    # CPUs of the local Ray a run starts when it joins no cluster (None: every core).
    local_cpus: Optional[int] = None

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker < 0 or self.extract_concurrency < 1:
            raise ConfigError("ray.num_workers and ray.extract_concurrency must be >= 1, ray.cpus_per_worker >= 0")


@config_section
class TrackingConfig:
    """MLflow; ``MLFLOW_TRACKING_URI`` wins over ``tracking_uri``."""

    tracking_uri: Optional[str] = None  # default (set by the pipelines): sqlite:///<output>/mlruns/mlflow.db
    experiment: str = "pading"


@config_section
class ServeConfig:
    """The Ray Serve endpoint (pipelines/serve.py) and its library side (pading.serving.service).

    Network binding, batching, autoscaling and resources of the deployment, request
    limits, and the classifier re-fit used when classes are added at run time
    (``POST /v1/classes``).
    """

    host: str = "127.0.0.1"  # bind address; 127.0.0.1 keeps the endpoint local
    port: int = 8000
    route_prefix: str = "/"
    # auto: batch on a GPU, run every request alone on CPU (measured faster there, README
    # "Serving"); on / off force it (true / false are accepted as on / off).
    batching: Literal["auto", "on", "off"] = "auto"
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = 32  # requests a replica works on at once
    # Backpressure: requests waiting for a replica beyond this many (per proxy) get 503 with
    # a Retry-After header at once instead of queueing without bound; -1 = no limit.
    max_queued_requests: int = 64
    retry_after_s: float = 1.0  # the Retry-After of those 503s
    request_timeout_s: float = 60.0  # a request not answered in time gets 503 (Retry-After)
    health_check_period_s: float = 10.0  # Serve calls check_health (a forward pass) this often
    health_check_timeout_s: float = 30.0  # a replica whose check takes longer is replaced
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_image_pixels: int = 16_000_000  # larger images are refused with 413
    max_body_bytes: int = 32 * 1024 * 1024  # larger request bodies are refused with 413
    max_new_classes: int = 64  # class names one POST /v1/classes may add
    fit_steps: int = 100  # classifier re-fit SGD steps when classes are added
    fit_per_class: int = 16  # synthetic embeddings per chosen class and step
    fit_batch_size: int = 512  # real reference embeddings per step
    # Where vocabulary changes are kept (docs/serving.md, "Vocabularies"): a directory every replica's node
    # sees, or "mlflow" (the tracking server). None: "vocabularies" next to a bundle directory; for a bundle
    # from MLflow (runs:/, models:/), the tracking server when it is one (http/https), else
    # ~/.pading/vocabularies/<run id or model name/version>, which only one machine sees: set it on a cluster.
    vocabulary_store: Optional[str] = None
    # A replica checks the store for a newer version before answering when its last check is older than this
    # (0: before every request, so a client never gets an answer without a class it added).
    vocabulary_refresh_s: float = 0.0
    max_vocabularies_per_replica: int = 8  # named vocabularies a replica keeps loaded (least recently used out)

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
        if self.vocabulary_refresh_s < 0 or self.max_vocabularies_per_replica < 1:
            raise ConfigError("serve.vocabulary_refresh_s must be >= 0 and serve.max_vocabularies_per_replica >= 1")
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

    num_samples: int = 16
    max_iterations: int = 0
    report_every: int = 200
    grace_period: int = 400  # iterations a trial runs before ASHA may stop it
    reduction_factor: int = 3
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    protocol: Literal["pseudo_unseen", "paper"] = "pseudo_unseen"
    pseudo_unseen_count: int = 4
    holdout_fraction: float = 0.2  # of the training images, by a stable hash of image_id
    search_space: dict = field(default_factory=_default_search_space)
    max_failures: int = 1  # retries of a crashed trial; a failed trial never stops the search

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

    seeds: tuple = (0, 1, 2)
    variants: tuple = ("projection", "gmmn", "primitive", "alignment", "full")
    primitive_counts: tuple = (100, 200, 300, 400, 500)
    iterations: int = 0
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    tsne_per_class: int = 60  # synthetic embeddings per unseen class in the t-SNE figure

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

    format: Literal["parquet", "coco-panoptic", "coco-instance", "semantic"] = "parquet"
    task: Optional[Literal["panoptic", "instance", "semantic", "all"]] = None
    shard_size: int = 64
    batch_size: int = 4  # images per segmenter forward pass inside an actor
    concurrency: int = 1  # actors holding the model
    num_cpus: float = 1.0  # per actor (also its torch threads)
    num_gpus: float = 0.0  # per actor
    min_score: float = 0.0  # segments scoring lower are left out
    input_column: str = "path"  # the column of paths in a Parquet/CSV input
    max_image_bytes: int = 64 * 1024 * 1024  # larger files are rejected unread
    max_image_pixels: int = 40_000_000  # larger images are rejected before decoding the pixels
    read_threads: int = 8  # files one actor reads and decodes at once

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1 or self.concurrency < 1 or self.read_threads < 1:
            raise ConfigError("segment.shard_size, batch_size, concurrency and read_threads must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ConfigError("segment.num_cpus/num_gpus must be >= 0, max_image_bytes/max_image_pixels >= 1")


@config_section
class ExperimentConfig:
    name: str = "pading"
    seed: int = 0
    output_dir: str = "outputs/pading"
    data: DataConfig = field(default_factory=DataConfig)
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    generator_training: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)  # extra unseen class names
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # the Serve endpoint (pipelines/serve.py)
    tune: TuneConfig = field(default_factory=TuneConfig)  # the Ray Tune search (pipelines/tune.py)
    tables: TablesConfig = field(default_factory=TablesConfig)  # the paper's tables (pipelines/tables.py)
    segment: SegmentConfig = field(default_factory=SegmentConfig)  # batch segmentation (pipelines/segment.py)

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


# ---- (de)serialisation ----------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
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
        _set_dotted(data, *parse_override(item))
    return from_dict(ExperimentConfig, data)


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
