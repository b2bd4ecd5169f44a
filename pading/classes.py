"""Class vocabularies: the COCO category lists and zero-shot splits that ship with the
package, and :class:`ClassTable`, the one mapping between dataset category ids,
contiguous class indices and seen/unseen membership used everywhere else.

Index convention (used by the segmenter, classifier, matcher, features Parquet and
evaluators): classes are numbered ``0 .. num_classes-1`` in table order, and
``num_classes`` (== ``no_object_index``) is "no object".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

from pading.errors import UnknownClassError

#: The zero-shot splits carried as package data (../shared/data/zero_shot_splits.json).
#: The three universal tasks, in the order tables print them.
TASKS = ("panoptic", "instance", "semantic")
#: Label of unlabeled pixels in COCO-Stuff / semantic label PNGs.
SEMANTIC_IGNORE_LABEL = 255
#: Metrics are reported in percent.
PERCENT = 100.0

SPLIT_NAMES = ("zsp_coco_panoptic_14", "zsi_coco_48_17", "zsi_coco_65_15", "zss_cocostuff_171_15")
#: Open-vocabulary splits over LVIS v1 (``resources/lvis_v1_splits.json``, docs/lvis.md): the
#: unseen classes are those whose LVIS ``frequency`` tag is listed in the split's ``unseen_frequency``.
LVIS_SPLIT_NAMES = ("ovis_lvis_v1_rare",)
#: LVIS frequency tags: rare (1-10 training images), common (11-100), frequent (> 100).
LVIS_FREQUENCIES = ("r", "c", "f")

_MERGED_SUFFIX = re.compile(r"-(merged|other|stuff)$")


def clean_name(name: str) -> str:
    """Human/text-encoder form of a COCO class name.

    ``"tree-merged"`` -> ``"tree"``, ``"sky-other-merged"`` -> ``"sky"``,
    ``"door-stuff"`` -> ``"door"``, ``"wall-brick"`` -> ``"wall brick"``,
    ``"traffic light"`` unchanged.
    """
    out = name.strip()
    while True:
        new = _MERGED_SUFFIX.sub("", out)
        if new == out:
            break
        out = new
    return out.replace("-", " ").replace("_", " ").strip()


def _load_resource(filename: str):
    with resources.files("pading.resources").joinpath(filename).open("r", encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=None)
def _coco_panoptic_categories() -> tuple:
    return tuple(
        (c["id"], c["name"], bool(c["isthing"]), tuple(c.get("color", (0, 0, 0))))
        for c in _load_resource("coco_panoptic_categories.json")
    )


def coco_panoptic_categories() -> list[dict]:
    """The 133 COCO panoptic categories (80 things, 53 stuff) as COCO-format dicts."""
    return [
        {"id": i, "name": n, "isthing": int(t), "color": list(col)}
        for i, n, t, col in _coco_panoptic_categories()
    ]


def coco_instance_categories() -> list[dict]:
    """The 80 COCO instance (thing) categories, COCO ids."""
    return [c for c in coco_panoptic_categories() if c["isthing"]]


def cocostuff_categories() -> list[dict]:
    """The 171 COCO-Stuff categories (80 things + 91 stuff, ids 1..182 with gaps)."""
    return [dict(c) for c in _load_resource("cocostuff_categories.json")]


def lvis_v1_categories() -> list[dict]:
    """The 1,203 LVIS v1 categories (``id``, ``name``, ``synonyms``, ``frequency`` r/c/f,
    ``synset``, ``def``), as the LVIS v1 annotation files carry them (all are things)."""
    return [dict(c) for c in _load_resource("lvis_v1_categories.json")["categories"]]


def zero_shot_split(name: str) -> dict:
    """A split of the zero-shot literature: ``{"task", "dataset", "unseen", ["seen"]}``; the
    LVIS splits add ``"unseen_frequency"`` (see :meth:`ClassTable.from_split`)."""
    splits = {**_load_resource("zero_shot_splits.json"), **_load_resource("lvis_v1_splits.json")}
    if name not in splits:
        raise UnknownClassError(f"split {name}", sorted(splits))
    return splits[name]


def default_categories_for_split(name: str) -> list[dict]:
    """The category list a split is defined over."""
    if name in LVIS_SPLIT_NAMES:
        return lvis_v1_categories()
    if name.startswith("zss_cocostuff"):
        return cocostuff_categories()
    if name.startswith("zsi_"):
        return coco_instance_categories()
    return coco_panoptic_categories()


@dataclass(frozen=True)
class ClassInfo:
    """One class of a vocabulary.

    Attributes:
        id: the dataset's category id (COCO id; arbitrary for run-time classes).
        name: the raw dataset name (``"tree-merged"``).
        isthing: countable object (instances) vs. amorphous stuff.
        unseen: never labelled in training.
        added: added at run time (e.g. through the Serve endpoint), not in the dataset.
    """

    id: int
    name: str
    isthing: bool
    unseen: bool = False
    added: bool = False

    @property
    def text(self) -> str:
        """The cleaned name given to text encoders."""
        return clean_name(self.name)


@dataclass(frozen=True)
class ClassTable:
    """An ordered vocabulary. Immutable and picklable (safe to ship to Ray workers).

    Example:
        >>> table = ClassTable.from_split("zsp_coco_panoptic_14")
        >>> table.num_classes, len(table.unseen_indices)
        (133, 14)
    """

    classes: tuple[ClassInfo, ...]
    _by_id: dict = field(init=False, repr=False, compare=False)
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        classes = tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        by_id, by_name = {}, {}
        for index, c in enumerate(classes):
            if c.id in by_id:
                raise ValueError(f"duplicate category id {c.id} ({c.name!r})")
            if c.name in by_name:
                raise ValueError(f"duplicate class name {c.name!r}")
            by_id[c.id] = index
            by_name[c.name] = index
        # Cleaned names resolve too, unless they collide with another class.
        for index, c in enumerate(classes):
            by_name.setdefault(c.text, index)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_name", by_name)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_categories(
        cls,
        categories: Sequence[dict],
        unseen: Iterable[str] = (),
        seen: Iterable[str] | None = None,
    ) -> "ClassTable":
        """Build from COCO-format category dicts (``id``, ``name``, optional ``isthing``).

        Args:
            categories: the dataset's categories, in id order.
            unseen: names of unseen classes; each must be in ``categories``.
            seen: if given, the vocabulary is restricted to ``seen ∪ unseen`` (as the
                ZSI 48/17 and 65/15 splits are); otherwise every category is kept.
        """
        cats = sorted(categories, key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        unseen = list(unseen)
        for n in unseen + list(seen or []):
            if n not in names:
                raise UnknownClassError(n, names)
        keep = None if seen is None else set(seen) | set(unseen)
        unseen_set = set(unseen)
        infos = [
            ClassInfo(
                id=int(c["id"]),
                name=c["name"],
                isthing=bool(c.get("isthing", 1)),
                unseen=c["name"] in unseen_set,
            )
            for c in cats
            if keep is None or c["name"] in keep
        ]
        return cls(tuple(infos))

    @classmethod
    def from_split(cls, split: str, categories: Sequence[dict] | None = None) -> "ClassTable":
        """The vocabulary of a named zero-shot split, over ``categories`` (default: the
        split's own dataset categories). Categories absent from ``categories`` are
        dropped from the split (for datasets that use a subset, like the synthetic one).

        A split with ``unseen_frequency`` (the LVIS ones) marks unseen the categories whose
        ``frequency`` tag is listed there, when every category carries one (the dataset's own
        tags decide, as LVIS defines "rare"); otherwise its ``unseen`` names are used."""
        spec = zero_shot_split(split)
        cats = list(categories) if categories is not None else default_categories_for_split(split)
        present = {c["name"] for c in cats}
        unseen = [n for n in spec["unseen"] if n in present]
        if "unseen_frequency" in spec and cats and all("frequency" in c for c in cats):
            unseen = [c["name"] for c in cats if c["frequency"] in spec["unseen_frequency"]]
        seen = [n for n in spec["seen"] if n in present] if "seen" in spec else None
        return cls.from_categories(cats, unseen=unseen, seen=seen)

    def to_records(self) -> list[dict]:
        """JSON-able rows (for bundles, MLflow, the Serve ``/v1/classes`` listing)."""
        return [
            {"index": i, "id": c.id, "name": c.name, "isthing": c.isthing, "unseen": c.unseen, "added": c.added}
            for i, c in enumerate(self.classes)
        ]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "ClassTable":
        rows = sorted(records, key=lambda r: r.get("index", 0))
        return cls(
            tuple(
                ClassInfo(
                    id=int(r["id"]),
                    name=str(r["name"]),
                    isthing=bool(r["isthing"]),
                    unseen=bool(r.get("unseen", False)),
                    added=bool(r.get("added", False)),
                )
                for r in rows
            )
        )

    def to_coco_categories(self) -> list[dict]:
        """COCO-format category dicts (for writing GT/prediction JSON)."""
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "supercategory": ""} for c in self.classes]

    def with_classes(self, extra: Iterable[ClassInfo]) -> "ClassTable":
        """A new table with ``extra`` appended (indices of existing classes unchanged)."""
        return ClassTable(self.classes + tuple(extra))

    def without(self, name: str) -> "ClassTable":
        """A new table with class ``name`` removed (later indices shift down by one)."""
        index = self.index_of_name(name)
        return ClassTable(self.classes[:index] + self.classes[index + 1 :])

    def with_unseen(self, names: Iterable[str]) -> "ClassTable":
        """A new table where exactly ``names`` are unseen."""
        names = set(names)
        for n in names:
            self.index_of_name(n)
        return ClassTable(tuple(replace(c, unseen=(c.name in names or c.text in names)) for c in self.classes))

    # ---- lookups ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, index: int) -> ClassInfo:
        return self.classes[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def no_object_index(self) -> int:
        return len(self.classes)

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def texts(self) -> list[str]:
        """Cleaned names, the text-encoder input."""
        return [c.text for c in self.classes]

    @property
    def seen_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if not c.unseen]

    @property
    def unseen_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.unseen]

    @property
    def thing_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.isthing]

    @property
    def unseen_ids(self) -> set[int]:
        return {c.id for c in self.classes if c.unseen}

    def has_id(self, category_id: int) -> bool:
        return int(category_id) in self._by_id

    def index_of_id(self, category_id: int) -> int:
        try:
            return self._by_id[int(category_id)]
        except KeyError:
            raise UnknownClassError(f"category id {category_id}", self.ids) from None

    def index_of_name(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            cleaned = clean_name(name)
            if cleaned in self._by_name:
                return self._by_name[cleaned]
            raise UnknownClassError(name, self.names) from None
