"""Vocabularies past a dataset's own classes (docs/lvis.md, "Past LVIS").

A run's class table comes from its dataset. ``vocabulary.extra_unseen`` appends more class
names as unseen classes, with no images: the generator learns to synthesise their query
embeddings from their names alone, and the retrained classifier (and so the bundle, the
endpoint and batch segmentation) covers them. The names come from

- ``imagenet21k``: the 21,843 ImageNet-21k (fall 2011) synsets, named by their WordNet lemmas.
  The list ships inside the ``timm`` wheel (``timm/data/_info``), so nothing is downloaded;
  a synset whose first lemma another synset already uses is named ``"first lemma (second
  lemma)"``, or by its WordNet id when it has no second lemma. Names equal to a class already
  in the table (``"dog"``) are left out: the dataset's class is that class;
- a text file, one class name per line (blank lines and ``#`` comments ignored). Here every
  name must be new: an empty name, a name listed twice or a name of the dataset's classes is
  refused, naming the setting and the line.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from pading.classes import ClassInfo, ClassTable, clean_name
from pading.errors import ConfigError

logger = logging.getLogger(__name__)

SETTING = "vocabulary.extra_unseen"
#: Built-in name lists (all ship with installed packages; nothing is downloaded).
BUILTIN = ("imagenet21k",)


def _timm_info_dir() -> Path:
    spec = importlib.util.find_spec("timm")  # the wheel's data files, without importing timm
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{SETTING}=imagenet21k needs the timm package (pip install timm): it ships the names")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


def imagenet21k_names() -> list[str]:
    """The 21,843 ImageNet-21k class names in synset order, unique (module docstring)."""
    info = _timm_info_dir()
    synsets = (info / "imagenet21k_goog_synsets.txt").read_text(encoding="utf-8").split()
    lemmas = {}
    for line in (info / "imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines():
        wnid, _, words = line.partition("\t")
        lemmas[wnid] = [w.strip() for w in words.split(",") if w.strip()]
    first = [lemmas.get(wnid, [wnid])[0] for wnid in synsets]
    counts: dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    names, taken = [], set()
    for wnid, name in zip(synsets, first):
        if counts[name] > 1:
            words = lemmas.get(wnid, [])
            name = f"{name} ({words[1]})" if len(words) > 1 else f"{name} ({wnid})"
        if name in taken:
            name = f"{name} {wnid}"
        taken.add(name)
        names.append(name)
    return names


def read_names(source: str) -> list[str]:
    """The names ``source`` (a built-in list or a text file) holds; a file's names must be
    non-empty and distinct (:class:`~pading.errors.ConfigError` naming the line otherwise)."""
    if source in BUILTIN:
        return imagenet21k_names()
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"{SETTING}={source!r} is neither a built-in list ({', '.join(BUILTIN)}) nor a file")
    names, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key = clean_name(text).lower()
        if not key:
            raise ConfigError(f"{SETTING}={source}: line {number} ({text!r}) is an empty class name once cleaned")
        if key in seen:
            raise ConfigError(f"{SETTING}={source}: line {number} repeats {text!r} (line {seen[key]})")
        seen[key] = number
        names.append(text)
    if not names:
        raise ConfigError(f"{SETTING}={source}: the file names no class")
    return names


def extend_with_unseen(table: ClassTable, source: str) -> ClassTable:
    """``table`` with the names of ``source`` appended as unseen thing classes, marked ``added``
    (not the dataset's; ids after the largest id of ``table``); see the module docstring for which
    names are kept."""
    names = read_names(source)
    existing = {clean_name(c.name).lower() for c in table}
    builtin = source in BUILTIN
    kept = []
    for name in names:
        if clean_name(name).lower() in existing:
            if not builtin:
                raise ConfigError(f"{SETTING}={source}: {name!r} is already a class of the dataset")
            continue
        kept.append(name)
    if builtin and len(kept) < len(names):
        logger.info("%s=%s: %d of %d names are classes of the dataset already, left out",
                    SETTING, source, len(names) - len(kept), len(names))
    first_id = max(table.ids, default=0) + 1
    extra = [ClassInfo(id=first_id + i, name=name, isthing=True, unseen=True, added=True)
             for i, name in enumerate(kept)]
    return table.with_classes(extra)
