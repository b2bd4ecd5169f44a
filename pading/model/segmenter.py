"""The segmenter: transformers' Mask2Former with a ResNet backbone (docs/method.md "Stages").

:class:`Segmenter` gives, per image, Q mask logits at 1/4 of the input resolution, the Q
query embeddings that the class head reads (the LayerNorm-ed output of the last
decoder layer) and the class logits of the *current* class head, which can be swapped
for a retrained classifier (:meth:`Segmenter.replace_class_head`). It also computes
Mask2Former's pretraining loss (Hungarian matching, CE + sigmoid-BCE + dice on sampled
points, auxiliary losses of every decoder layer): transformers' criterion, computed for all
layers and images at once (:mod:`pading.model.criterion`).

Preprocessing lives here too: :func:`prepare_batch` (resize the long side, ImageNet
normalisation, pad bottom/right) and :func:`postprocess_mask_logits` (undo it).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import Mask2FormerConfig

# transformers' Mask2Former is imported where a model is built, not with this module: the
# helpers here (prepare_batch, postprocess_mask_logits, read_safetensors) serve processes that
# never build one (the pipelines' drivers), and the import costs 2-3 s of CPU per process.

from pading.config import SegmenterConfig, from_dict, to_dict
from pading.errors import AnnotationError, ConfigError, DataError, MissingWeightsError
from pading.model.criterion import mask2former_loss

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
PIXEL_DECODER_NORM_GROUPS = 32  # the pixel decoder uses GroupNorm(32, feature_size)
WEIGHTS_FILE = "segmenter.safetensors"
META_FILE = "segmenter.json"
FORMAT_VERSION = 1
# Parameters that may legitimately differ from a pretrained checkpoint (other class count).
CLASS_HEAD_PREFIXES = ("class_predictor.", "criterion.")


@dataclass
class SegmenterOutput:
    """Per-batch segmenter outputs.

    Attributes:
        mask_logits: (B, Q, H/4, W/4) mask logits of the last decoder layer.
        query_embeddings: (B, Q, D) LayerNorm-ed last decoder output (what the class head reads).
        class_logits: (B, Q, C+1) logits of the current class head; column C is "no object".
    """

    mask_logits: Tensor
    query_embeddings: Tensor
    class_logits: Tensor


def build_mask2former_config(config: SegmenterConfig, num_classes: int) -> Mask2FormerConfig:
    """The transformers config of a Mask2Former with a ResNet backbone, from ``config``."""
    from transformers import Mask2FormerConfig, ResNetConfig

    if config.mask_feature_size % PIXEL_DECODER_NORM_GROUPS:
        raise ConfigError(
            f"segmenter.mask_feature_size must be a multiple of {PIXEL_DECODER_NORM_GROUPS}, "
            f"got {config.mask_feature_size}"
        )
    if config.hidden_dim % config.num_heads:
        raise ConfigError(
            f"segmenter.hidden_dim ({config.hidden_dim}) must be divisible by num_heads ({config.num_heads})"
        )
    if config.decoder_layers < 2:
        raise ConfigError("segmenter.decoder_layers must be >= 2 (1 learnable-query layer + transformer layers)")
    backbone = ResNetConfig(
        embedding_size=config.backbone_embedding_size,
        hidden_sizes=list(config.backbone_hidden_sizes),
        depths=list(config.backbone_depths),
        layer_type="bottleneck",
        out_features=BACKBONE_OUT_FEATURES,
    )
    encoder_ffn = config.encoder_feedforward_dim or config.feedforward_dim // 2
    return Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=num_classes,
        feature_size=config.mask_feature_size,
        mask_feature_size=config.mask_feature_size,
        hidden_dim=config.hidden_dim,
        encoder_feedforward_dim=encoder_ffn,
        dim_feedforward=config.feedforward_dim,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        num_attention_heads=config.num_heads,
        num_queries=config.num_queries,
        train_num_points=config.train_num_points,
        class_weight=config.class_weight,
        mask_weight=config.mask_weight,
        dice_weight=config.dice_weight,
        no_object_weight=config.no_object_weight,
    )


# ---- checkpoint reading -------------------------------------------------------------


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file. A file that is not one (e.g. a pickle put in
    its place) raises DataError naming it; nothing in it is ever unpickled or run."""
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise DataError(str(path), "weights file is missing") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise DataError(str(path), f"not a safetensors weights file ({type(err).__name__}: {err}); "
                        "weights are only read from safetensors, never unpickled") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file or a save_pretrained directory (safetensors or a
    ``weights_only`` torch file; never pickle)."""
    if not path.exists():
        raise MissingWeightsError(f"weights path {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt*"))
        if not files:
            raise MissingWeightsError(f"{path} holds no *.safetensors / *.bin / *.pt(h) weights file")
    else:
        files = [path]
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                loaded = read_safetensors(file)
            else:  # weights_only: tensors and plain containers, never arbitrary pickled objects
                loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MissingWeightsError(f"{file}: cannot read weights ({type(err).__name__}: {err}); checkpoints "
                                      "are loaded with weights_only=True, so pickled objects are refused") from err
        for nest_key in ("state_dict", "model"):
            if isinstance(loaded, dict) and isinstance(loaded.get(nest_key), dict):
                loaded = loaded[nest_key]
        state.update({k: v for k, v in loaded.items() if isinstance(v, Tensor)})
    return state


_TORCHVISION_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$")
_TORCHVISION_DOWNSAMPLE = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def _to_backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ResNet checkpoint (transformers ResNetModel / ResNetForImageClassification /
    a whole Mask2Former, or torchvision's resnet naming) to ResNetBackbone keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("mask2former.", "model.pixel_level_module.encoder.", "resnet."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key.startswith(("conv1.", "bn1.")):
            part = "convolution" if key.startswith("conv1.") else "normalization"
            key = f"embedder.embedder.{part}.{key.split('.', 1)[1]}"
        elif match := _TORCHVISION_BLOCK.match(key):
            stage, block, kind, index, rest = match.groups()
            part = "convolution" if kind == "conv" else "normalization"
            key = f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(index) - 1}.{part}.{rest}"
        elif match := _TORCHVISION_DOWNSAMPLE.match(key):
            stage, block, index, rest = match.groups()
            part = "convolution" if index == "0" else "normalization"
            key = f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{rest}"
        out[key] = value
    return out


def _load_matching(
    module: nn.Module, state: dict[str, Tensor], *, source: str, optional_prefixes=(), warn_skipped: bool = True
) -> None:
    """Load ``state`` into ``module``; every parameter not under ``optional_prefixes`` must be
    present with the right shape, else :class:`MissingWeightsError` names what is wrong."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional_prefixes)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and not k.startswith(optional_prefixes)
    ]
    if missing or mismatched:
        examples = (missing + mismatched)[:5]
        raise MissingWeightsError(
            f"{source}: {len(missing)} missing and {len(mismatched)} wrongly shaped tensors for this "
            f"architecture (check the segmenter sizes in the config), e.g. {examples}"
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    skipped = sorted(k for k in own if k not in usable)
    if skipped and warn_skipped:
        logger.warning("%s: %d tensors left at their initial values (%s...)", source, len(skipped), skipped[:3])
    module.load_state_dict(usable, strict=False)


def _in_class_head(key: str) -> bool:
    """Whether a saved segmenter's tensor ``key`` belongs to the class head or the loss's class
    weights (which follow the head's class count)."""
    return key.removeprefix("mask2former.").startswith(CLASS_HEAD_PREFIXES)


def _write_saved(directory: Path, state: dict[str, Tensor], config: SegmenterConfig, num_classes: int,
                 head_saved: bool) -> Path:
    """``segmenter.safetensors`` (``state``) and ``segmenter.json`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"format_version": FORMAT_VERSION, "num_classes": int(num_classes), "class_head_saved": head_saved,
            "config": to_dict(config)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def _read_description(directory: Path) -> tuple[int, bool, dict]:
    """(num_classes, class_head_saved, config dict) of a saved segmenter's ``segmenter.json``."""
    meta_path = directory / META_FILE
    if not meta_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise MissingWeightsError(f"{directory} is not a saved segmenter (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return int(meta["num_classes"]), bool(meta.get("class_head_saved", True)), dict(meta["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(str(meta_path), f"not a valid segmenter description ({err})") from err


# ---- the model ----------------------------------------------------------------------


def import_backend() -> None:
    """Import the transformers modules a :class:`Segmenter` is built from. Their first import in
    a process takes 2-2.5 s on the project's 2-core machine (transformers pulls in
    ``torch._dynamo`` and ``torch.distributed.tensor``); a driver that will build a segmenter
    later can pay it while it only waits (pipelines/full.py; docs/performance.md, "The demo's
    wall time")."""
    from transformers import Mask2FormerForUniversalSegmentation  # noqa: F401


class Segmenter(nn.Module):
    """Mask2Former (transformers) with a ResNet backbone and a swappable class head.

    Args:
        config: sizes, loss weights and optional local weights (``weights``: a
            :meth:`save` directory or a transformers ``save_pretrained`` directory of a
            whole Mask2Former; ``backbone_weights``: a ResNet checkpoint file or directory).
            None -> random initialisation.
        num_classes: C, excluding "no object".
    """

    def __init__(self, config: SegmenterConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.num_classes = int(num_classes)
        # set by pading.model.runtime.use_runtime: an exported forward pass that inference calls use
        self.inference_runtime = None
        from transformers import Mask2FormerForUniversalSegmentation

        self.mask2former = Mask2FormerForUniversalSegmentation(build_mask2former_config(config, self.num_classes))
        if config.weights is not None:
            if config.backbone_weights is not None:
                logger.info("segmenter.weights given: backbone_weights %s is not used", config.backbone_weights)
            path = Path(config.weights)
            state = _read_state_dict(path / WEIGHTS_FILE if (path / META_FILE).is_file() else path)
            state = {k.removeprefix("mask2former."): v for k, v in state.items()}
            _load_matching(self.mask2former, state, source=str(path), optional_prefixes=CLASS_HEAD_PREFIXES)
        elif config.backbone_weights is not None:
            state = _to_backbone_keys(_read_state_dict(Path(config.backbone_weights)))
            _load_matching(self.backbone, state, source=str(config.backbone_weights))

    @property
    def backbone(self) -> nn.Module:
        """The transformers ``ResNetBackbone``."""
        return self.mask2former.model.pixel_level_module.encoder

    @property
    def class_head(self) -> nn.Module:
        """The module mapping query embeddings (…, D) to class logits (…, C+1)."""
        return self.mask2former.class_predictor

    def replace_class_head(self, module: nn.Module, *, num_classes: Optional[int] = None) -> None:
        """Use ``module`` ((…, D) -> (…, C'+1)) as the class head from now on.

        C' is ``num_classes`` if given, else read from ``module.out_features`` (Linear) or
        ``module.num_classes``, else from one probe call. The loss's class weights follow.
        """
        if num_classes is None:
            if isinstance(getattr(module, "out_features", None), int):
                num_classes = module.out_features - 1
            elif isinstance(getattr(module, "num_classes", None), int):
                num_classes = module.num_classes
            else:
                reference = next(self.parameters())
                with torch.no_grad():
                    probe = torch.zeros(1, self.config.hidden_dim, device=reference.device, dtype=reference.dtype)
                    num_classes = int(module(probe).shape[-1]) - 1
        if num_classes < 1:
            raise ConfigError(f"the new class head must have >= 2 outputs (classes + no object), got {num_classes + 1}")
        self.mask2former.class_predictor = module
        self.num_classes = int(num_classes)
        loss_config = copy.deepcopy(self.mask2former.config)
        loss_config.num_labels = self.num_classes
        device = next(self.parameters()).device
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

        criterion = Mask2FormerLoss(config=loss_config, weight_dict=self.mask2former.weight_dict)
        self.mask2former.criterion = criterion.to(device)

    def classify(self, query_embeddings: Tensor) -> Tensor:
        """(…, D) query embeddings -> (…, C+1) logits of the current class head."""
        return self.class_head(query_embeddings)

    def _decode(self, pixel_values: Tensor, pixel_mask: Optional[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per decoder layer (learnable-query layer first): query embeddings (B, Q, D) and
        mask logits (B, Q, H/4, W/4)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise DataError("pixel_values", f"expected a (B, 3, H, W) tensor, got {tuple(pixel_values.shape)}")
        outputs = self.mask2former.model(
            pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True, return_dict=True
        )
        # transformers keeps (Q, B, D); the class predictor reads these LayerNorm-ed states.
        queries = [state.transpose(0, 1) for state in outputs.transformer_decoder_intermediate_states]  # L x (B, Q, D)
        return queries, list(outputs.masks_queries_logits)  # L x (B, Q, H/4, W/4)

    def forward(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> SegmenterOutput:
        """pixel_values (B, 3, H, W) (ImageNet-normalised), pixel_mask (B, H, W) 1 = image
        (accepted for API symmetry; transformers' Mask2Former does not use it).

        Inference calls (eval mode, no autograd) run on the attached ``inference_runtime``
        when it accepts them (pading.model.runtime), everything else on torch."""
        runtime = self.inference_runtime
        if runtime is not None and runtime.accepts(self, pixel_values):
            mask_logits, query_embeddings = runtime(pixel_values)
        else:
            queries, masks = self._decode(pixel_values, pixel_mask)
            mask_logits, query_embeddings = masks[-1], queries[-1]
        return SegmenterOutput(
            mask_logits=mask_logits,  # (B, Q, H/4, W/4)
            query_embeddings=query_embeddings,
            class_logits=self.classify(query_embeddings),  # (B, Q, C+1)
        )

    def compute_loss(
        self,
        pixel_values: Tensor,
        mask_labels: Sequence[Tensor],
        class_labels: Sequence[Tensor],
        pixel_mask: Optional[Tensor] = None,
        num_masks: Optional[float] = None,
    ) -> dict[str, Tensor]:
        """Mask2Former's weighted training loss.

        Args:
            pixel_values: (B, 3, H, W).
            mask_labels: B tensors (N_i, H', W') of {0, 1} (N_i may be 0).
            class_labels: B tensors (N_i,) of class indices in [0, C).
            num_masks: the mask terms' divisor (:func:`pading.model.criterion.mask2former_loss`;
                default this batch's target count).
        Returns:
            ``{"loss": total, "loss_cross_entropy", "loss_mask", "loss_dice", and the same
            with suffix _0.._{L-2} for the auxiliary decoder layers}``, already weighted.
        """
        batch_size = pixel_values.shape[0]
        if len(mask_labels) != batch_size or len(class_labels) != batch_size:
            raise AnnotationError("targets", f"expected {batch_size} mask and class label entries")
        device = pixel_values.device
        masks_list, labels_list = [], []
        for i, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
            labels = torch.as_tensor(labels, dtype=torch.long, device=device)
            masks = torch.as_tensor(masks, device=device).to(pixel_values.dtype)
            if masks.dim() != 3 or labels.dim() != 1 or masks.shape[0] != labels.shape[0]:
                shapes = f"masks {tuple(masks.shape)} and labels {tuple(labels.shape)}"
                raise AnnotationError(f"targets[{i}]", f"{shapes} must be (N, H, W) and (N,)")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                reason = f"class labels must lie in [0, {self.num_classes}), got {labels.tolist()}"
                raise AnnotationError(f"targets[{i}]", reason)
            masks_list.append(masks)
            labels_list.append(labels)
        queries, masks = self._decode(pixel_values, pixel_mask)
        class_logits = self.classify(torch.stack(queries)).unbind(0)  # L x (B, Q, C+1), one call of the head
        # transformers' criterion, batched over layers and images (pading.model.criterion)
        losses = mask2former_loss(self.mask2former.criterion, self.mask2former.weight_dict, masks, class_logits,
                                  masks_list, labels_list, num_masks=num_masks)
        return {"loss": sum(losses.values()), **losses}

    # ---- persistence ------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``segmenter.safetensors`` and ``segmenter.json`` (config, num_classes).

        A Linear class head is saved with the rest; any other head (a replaced
        classifier) is left out, with the loss's class weights, and must be saved and
        re-attached by its owner (the bundle).
        """
        head_saved = isinstance(self.class_head, nn.Linear)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if head_saved or not _in_class_head(k)}
        return _write_saved(Path(directory), state, self.config, self.num_classes, head_saved)

    @staticmethod
    def save_without_class_head(source: str | Path, destination: str | Path, num_classes: int) -> Path:
        """Write the segmenter :meth:`save`-d in ``source`` to ``destination`` as :meth:`save`
        writes it once a classifier of ``num_classes`` classes has replaced its class head (a
        bundle's segmenter), without building the model: the same tensors less the class head
        and the loss's class weights, which :meth:`load` and :meth:`replace_class_head` rebuild.
        The generator stage writes its bundle this way, sparing its worker the 2.3-2.9 s of a
        first Mask2Former build (docs/performance.md, "Fixed costs taken out")."""
        source = Path(source)
        _, _, config_data = _read_description(source)
        config_data.update(weights=None, backbone_weights=None)  # as load() gives it
        config = from_dict(SegmenterConfig, config_data, prefix="segmenter")
        state = {k: v for k, v in read_safetensors(source / WEIGHTS_FILE).items() if not _in_class_head(k)}
        return _write_saved(Path(destination), state, config, num_classes, head_saved=False)

    @classmethod
    def load(cls, directory: str | Path, map_location: Optional[str | torch.device] = None) -> "Segmenter":
        """Rebuild a :meth:`save`-d segmenter (no pickle). If the class head was not saved,
        a freshly initialised Linear head stands in until :meth:`replace_class_head`."""
        directory = Path(directory)
        num_classes, head_saved, config_data = _read_description(directory)
        config_data.update(weights=None, backbone_weights=None)  # the weights are in this directory
        model = cls(from_dict(SegmenterConfig, config_data, prefix="segmenter"), num_classes)
        state = read_safetensors(directory / WEIGHTS_FILE)
        optional = () if head_saved else CLASS_HEAD_PREFIXES  # a replaced head: its loss weights follow it
        state = {k.removeprefix("mask2former."): v for k, v in state.items()}
        _load_matching(model.mask2former, state, source=str(directory), optional_prefixes=optional, warn_skipped=False)
        if not head_saved:
            logger.info("%s: class head not saved (a replaced classifier); re-attach it", directory)
        return model.to(map_location) if map_location is not None else model

    @staticmethod
    def load_class_head(directory: str | Path, map_location: Optional[str | torch.device] = None) -> nn.Linear:
        """The ``Linear(D, C+1)`` class head of the segmenter :meth:`save`-d in ``directory``,
        read alone: equal to ``Segmenter.load(directory).class_head`` without building the
        model, whose first build in a process takes 2.3-2.9 s (transformers' Mask2Former
        import). The generator's trainers start their classifier from it."""
        directory = Path(directory)
        num_classes, head_saved, config_data = _read_description(directory)
        if not head_saved:
            raise DataError(str(directory), "the class head was not saved with this segmenter (a bundle's "
                                            "segmenter: its classifier is saved beside it)")
        path = directory / WEIGHTS_FILE
        names = [f"mask2former.{CLASS_HEAD_PREFIXES[0]}{name}" for name in ("weight", "bias")]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as weights:
                weight, bias = (weights.get_tensor(name) for name in names)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise DataError(str(path), f"no readable class head ({type(err).__name__}: {err})") from None
        expected = (num_classes + 1, int(config_data.get("hidden_dim", weight.shape[-1])))
        if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
            raise DataError(str(path), f"class head of shape {tuple(weight.shape)} / {tuple(bias.shape)}, "
                                       f"expected {expected} for {num_classes} classes")
        head = nn.Linear(expected[1], expected[0])
        head.load_state_dict({"weight": weight, "bias": bias})
        return head.to(map_location) if map_location is not None else head


# ---- preprocessing ------------------------------------------------------------------


def prepare_batch(
    images: Sequence[np.ndarray],
    size: int,
    targets: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None,
    *,
    sources: Optional[Sequence[str]] = None,
) -> dict:
    """Resize (long side = ``size``, aspect kept), normalise and pad images to S×S.

    Args:
        images: B arrays (H, W, 3) uint8 RGB.
        size: S.
        targets: optional B pairs (masks (N, H, W) bool, labels (N,) int).
        sources: names for error messages (file paths); default ``batch image {i}``.
    Returns:
        ``pixel_values`` (B, 3, S, S) float32, ``pixel_mask`` (B, S, S) long (1 = image),
        ``meta`` (B dicts: ``original_size`` (H, W), ``resized_size`` (h, w), ``input_size`` S)
        and, with targets, ``mask_labels`` (B tensors (N, S, S) float) and ``class_labels``
        (B tensors (N,) long).
    """
    if size < 1:
        raise ConfigError(f"image size must be >= 1, got {size}")
    names = list(sources) if sources is not None else [f"batch image {i}" for i in range(len(images))]
    if targets is not None and len(targets) != len(images):
        raise AnnotationError("targets", f"{len(targets)} targets for {len(images)} images")
    batch = len(images)
    pixel_values = torch.zeros(batch, 3, size, size, dtype=torch.float32)
    pixel_mask = torch.zeros(batch, size, size, dtype=torch.long)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    meta, mask_labels, class_labels = [], [], []
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise DataError(names[i], f"expected an (H, W, 3) uint8 array, got {type(image).__name__} {shape}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise DataError(names[i], "empty image")
        scale = size / max(height, width)
        resized = (max(1, round(height * scale)), max(1, round(width * scale)))
        # a decoded image may be a read-only view (torch warns on those); copied only then
        image = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0  # (1, 3, H, W)
        pixels = F.interpolate(pixels, size=resized, mode="bilinear", align_corners=False, antialias=True)[0]
        pixel_values[i, :, : resized[0], : resized[1]] = (pixels - mean) / std
        pixel_mask[i, : resized[0], : resized[1]] = 1
        meta.append({"original_size": (height, width), "resized_size": resized, "input_size": size})
        if targets is None:
            continue
        masks, labels = np.asarray(targets[i][0]), np.asarray(targets[i][1])
        if masks.ndim != 3 or masks.shape[1:] != (height, width) or labels.shape != (masks.shape[0],):
            raise AnnotationError(
                names[i], f"masks {masks.shape} / labels {labels.shape} do not fit an image of {height}x{width}"
            )
        padded = torch.zeros(masks.shape[0], size, size, dtype=torch.float32)  # (N, S, S)
        if masks.shape[0]:
            mask_tensor = torch.from_numpy(masks.astype(np.float32))[None]  # (1, N, H, W)
            padded[:, : resized[0], : resized[1]] = F.interpolate(mask_tensor, size=resized, mode="nearest-exact")[0]
        mask_labels.append(padded)
        class_labels.append(torch.as_tensor(labels, dtype=torch.long))
    out = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "meta": meta}
    if targets is not None:
        out.update(mask_labels=mask_labels, class_labels=class_labels)
    return out


def postprocess_mask_logits(mask_logits: Tensor, meta: dict) -> Tensor:
    """(Q, S/4, S/4) mask logits -> (Q, H, W) at the original image size: upsample to S,
    crop the padding, resize (bilinear) to the original size.

    Each query's map is resized as an image of its own (a batch of Q one-channel images), so
    its values do not depend on which other queries are resized with it nor on the thread
    count; resized as Q channels of one image they did, in the last bit (docs/performance.md,
    "Resizing only the queries a task uses")."""
    size = meta["input_size"]
    height, width = meta["resized_size"]
    logits = F.interpolate(mask_logits[:, None], size=(size, size), mode="bilinear", align_corners=False)
    logits = logits[:, :, :height, :width]  # (Q, 1, h, w)
    return F.interpolate(logits, size=tuple(meta["original_size"]), mode="bilinear", align_corners=False)[:, 0]


class OriginalSizeMaskLogits:
    """One image's (Q, H, W) mask logits at its original size (:func:`postprocess_mask_logits`),
    resized only for the queries that post-processing asks for (:meth:`rows`).

    The panoptic merge keeps the few queries whose class is confident (4 of the demo's 16 on its
    val images); resizing only those took a 640 px panoptic answer from 30 to 20 ms on one thread
    (docs/performance.md, "Resizing only the queries a task uses"). The rows equal those of
    ``postprocess_mask_logits(all)`` exactly."""

    def __init__(self, low_res: Tensor, meta: dict):
        self.low_res, self.meta = low_res, meta  # (Q, S/4, S/4)
        self.shape = torch.Size((low_res.shape[0], *(int(v) for v in meta["original_size"])))
        self.device = low_res.device
        self._all: Optional[Tensor] = None

    def dim(self) -> int:
        return 3

    def rows(self, index: Optional[Tensor] = None) -> Tensor:
        """(len(index), H, W) logits of the queries ``index`` (1-D long), in that order; None: all
        of them (kept for later calls)."""
        if self._all is None and index is not None and index.numel() < self.shape[0]:
            return postprocess_mask_logits(self.low_res[index], self.meta)
        if self._all is None:
            self._all = postprocess_mask_logits(self.low_res, self.meta)
        return self._all if index is None else self._all[index]
