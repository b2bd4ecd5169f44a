"""A corpus of broken and unusual COCO dataset inputs, for the prepare stage (docs/bad_inputs.md).

:func:`build_corpus` copies a clean synthetic dataset (``pading.data.write_synthetic_dataset``)
and adds one new image (or record) per kind of bad input to it, in the panoptic or the
instances layout, each built from a copy of a clean image and then broken in one way. Where
the shared real COCO data is given, a few kinds use real files (a truncated real JPEG, a real
image with its real panoptic PNG or instance annotations). Every added item is a
:class:`Case`: accepted (its image id must reach the manifest) or rejected (a reject must name
its file or record and give the expected reason). The clean images are never touched, so a
run on the corpus must keep every one of them.

    python tests/helpers/bad_corpus.py OUT_DIR [panoptic|instances]   # write a corpus to look at
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pading.data.targets import mask_to_rle

LAYOUTS = ("panoptic", "instances")
SPLITS = ("train", "val")
FIRST_CASE_IMAGE_ID = {"val": 2_000_001, "train": 900_001}
FIRST_CASE_ANNOTATION_ID = 5_000_001
BOMB_SIDE = 14_000  # 196 M pixels: over Pillow's 2 x MAX_IMAGE_PIXELS, so Image.open refuses it


@dataclass
class Case:
    """One kind of input, as added to the corpus.

    Attributes:
        kind: the row of docs/bad_inputs.md.
        split: where it was added.
        image_id: the image it is about (its id in the manifest when accepted).
        accepted: whether the image must reach the manifest.
        reason: a substring of the reject reason (rejected cases).
        records: what a reject of this case names (a file name or record key, matched as a
            substring of the reject's source or key); the first must carry ``reason``, the
            others are further rejects the case may cause (e.g. the image of a bad annotation).
    """

    kind: str
    split: str
    image_id: int
    accepted: bool
    reason: str = ""
    records: tuple[str, ...] = ()


@dataclass
class Corpus:
    root: Path
    layout: str
    cases: list[Case]
    clean_ids: dict[str, list[int]]  # split -> every image id of the clean dataset
    clean_seen_only: dict[str, list[int]]  # split -> those without an unseen class (train keeps only them)

    def expected_ids(self, split: str) -> set[int]:
        """The image ids the manifest of ``split`` must hold: the clean ones that pass the
        seen-only filter (val keeps all) and every accepted case."""
        ids = set(self.clean_seen_only[split] if split == "train" else self.clean_ids[split])
        return ids | {c.image_id for c in self.cases if c.accepted and c.split == split}

    def kinds(self) -> list[str]:
        return sorted({c.kind for c in self.cases})


@dataclass
class _Item:
    """A new image of the corpus: its ``images`` entry, annotation(s) and files (mutable
    until :meth:`_Writer.save` writes the JSON)."""

    split: str
    entry: dict
    anns: list[dict]
    image_path: Path
    png_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def image_id(self) -> int:
        return self.entry["id"]

    @property
    def name(self) -> str:
        return self.entry["file_name"]


def _json_path(root: Path, layout: str, split: str) -> Path:
    return root / "annotations" / f"{layout}_{split}2017.json"


class _Writer:
    def __init__(self, root: Path, layout: str, unseen_ids: set[int]):
        self.root, self.layout = root, layout
        self.data = {split: json.loads(_json_path(root, layout, split).read_text()) for split in SPLITS}
        self.next_image = dict(FIRST_CASE_IMAGE_ID)
        self.next_annotation = FIRST_CASE_ANNOTATION_ID
        self.templates = {split: self._template(split, unseen_ids) for split in SPLITS}

    def _anns_of(self, split: str, image_id: int) -> list[dict]:
        return [a for a in self.data[split]["annotations"] if a["image_id"] == image_id]

    def _template(self, split: str, unseen_ids: set[int]) -> dict:
        """A clean image with at least two segments / a polygon instance (and, in train, no
        unseen class: the seen-only filter would drop it)."""
        for image in self.data[split]["images"]:
            anns = self._anns_of(split, image["id"])
            if self.layout == "panoptic":
                segments = anns[0]["segments_info"] if anns else []
                usable = len(segments) >= 2
                categories = {s["category_id"] for s in segments}
            else:
                usable = any(isinstance(a["segmentation"], list) for a in anns)
                categories = {a["category_id"] for a in anns}
            if usable and not (split == "train" and categories & unseen_ids):
                return image
        raise RuntimeError(f"no clean {split} image fits as a template; write the base with another seed")

    def template_pixels(self, split: str = "val") -> np.ndarray:
        return np.asarray(Image.open(self.root / f"{split}2017" / self.templates[split]["file_name"]).convert("RGB"))

    def new_image(self, split: str = "val", file_name: str | None = None, image_id: int | None = None) -> _Item:
        """A copy of the split's template image (file, entry, annotations) under a new id."""
        template = self.templates[split]
        if image_id is None:
            image_id = self.next_image[split]
            self.next_image[split] += 1
        name = file_name or f"{image_id:012d}.jpg"
        image_path = self.root / f"{split}2017" / name
        image_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / f"{split}2017" / template["file_name"], image_path)
        entry = dict(template, id=image_id, file_name=name)
        self.data[split]["images"].append(entry)
        anns, png_path = [], None
        if self.layout == "panoptic":
            png_path = self.root / f"panoptic_{split}2017" / f"{image_id:012d}.png"
            shutil.copyfile(self.root / f"panoptic_{split}2017" / f"{template['file_name'][:-4]}.png", png_path)
            ann = copy.deepcopy(self._anns_of(split, template["id"])[0])
            ann.update(image_id=image_id, file_name=png_path.name)
            anns.append(ann)
        else:
            for source in self._anns_of(split, template["id"]):
                anns.append(dict(copy.deepcopy(source), id=self.new_annotation_id(), image_id=image_id))
        self.data[split]["annotations"].extend(anns)
        return _Item(split, entry, anns, image_path, png_path)

    def new_annotation_id(self) -> int:
        self.next_annotation += 1
        return self.next_annotation - 1

    def drop_entry(self, item: _Item) -> None:
        self.data[item.split]["images"].remove(item.entry)

    def drop_annotations(self, item: _Item) -> None:
        for ann in item.anns:
            self.data[item.split]["annotations"].remove(ann)
        item.anns.clear()

    def add_categories(self, split: str, categories: list[dict]) -> None:
        known = {c["id"] for c in self.data[split]["categories"]}
        self.data[split]["categories"].extend(c for c in categories if c["id"] not in known)

    def position(self, split: str, entry: dict) -> int:
        return next(i for i, e in enumerate(self.data[split]["images"]) if e is entry)

    def save(self) -> None:
        for split in SPLITS:
            _json_path(self.root, self.layout, split).write_text(json.dumps(self.data[split]))  # NaN written as NaN


def _write_bomb_png(path: Path, side: int = BOMB_SIDE) -> None:
    """A valid, tiny (~20 kB) 1-bit PNG of side x side black pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


def _replace_suffix(writer: _Writer, item: _Item, suffix: str) -> None:
    item.image_path.unlink()
    item.entry["file_name"] = item.name.rsplit(".", 1)[0] + suffix
    item.image_path = item.image_path.with_suffix(suffix)


# ---- the kinds ----------------------------------------------------------------------------
def _image_file_cases(writer: _Writer, real: Path | None) -> list[Case]:
    """Kinds about the image file and its ``images`` entry (both layouts)."""
    cases, pixels = [], writer.template_pixels()

    def rejected(kind, item, reason, *records):
        cases.append(Case(kind, item.split, item.image_id, False, reason, records or (item.name,)))

    def accepted(kind, item):
        cases.append(Case(kind, item.split, item.image_id, True))

    item = writer.new_image()
    item.image_path.write_bytes(b"")
    rejected("zero-byte image", item, "file is empty")

    item = writer.new_image()
    if real is not None:  # a real COCO photo cut in half, with its real size
        photo = sorted((real / "coco-samples" / "val2017").glob("*.jpg"))[0]
        with Image.open(photo) as image:
            item.entry.update(width=image.width, height=image.height)
        if writer.layout == "instances":  # the template's 32x32 RLEs would not fit the real size
            writer.drop_annotations(item)
        data = photo.read_bytes()
    else:
        data = item.image_path.read_bytes()
    item.image_path.write_bytes(data[: len(data) // 2])
    rejected("truncated JPEG", item, "cannot be decoded")

    item = writer.new_image()
    item.image_path.write_text("this is a caption, not a photo\n")
    rejected("text file named .jpg", item, "not an image file")

    item = writer.new_image()
    item.image_path.unlink()
    rejected("missing image file", item, "file does not exist")

    item = writer.new_image()
    item.image_path.unlink()
    item.image_path.mkdir()
    rejected("directory named .jpg", item, "is not a regular file")

    item = writer.new_image()
    _replace_suffix(writer, item, ".png")
    _write_bomb_png(item.image_path)
    rejected("decompression bomb (14000x14000 PNG)", item, "exceeds limit")

    item = writer.new_image()
    Image.fromarray(np.concatenate([pixels, pixels[:, :8]], axis=1)).save(item.image_path, quality=95)
    rejected("image size differs from the JSON", item, "but the annotation says")

    item = writer.new_image()
    item.entry["height"] = 0
    rejected("height 0 in the JSON", item, "not a positive integer", f"image_id={item.image_id}")

    item = writer.new_image()
    item.entry["width"] = str(item.entry["width"])
    rejected("width given as a string", item, "not a positive integer", f"image_id={item.image_id}")

    item = writer.new_image()
    del item.entry["file_name"]
    rejected("images entry without file_name", item, "missing key(s) 'file_name'", f"image_id={item.image_id}")

    item = writer.new_image()
    clean_train = writer.data["train"]["images"][0]["file_name"]
    item.entry["file_name"] = f"../train2017/{clean_train}"  # a real, decodable file, outside val2017
    rejected("file_name leaving the image folder", item, "leaves the image folder", f"image_id={item.image_id}")

    item = writer.new_image()
    item.entry["file_name"] = "\udc80" + item.entry["file_name"]  # JSON "\udc80": a lone surrogate escape
    rejected("file_name that is not valid Unicode", item, "is not valid Unicode", f"image_id={item.image_id}")

    item = writer.new_image()
    position = writer.position("val", item.entry)
    item.entry["id"] = str(item.image_id)
    if writer.layout == "panoptic":
        records = (f"images[{position}]", f"image_id={item.image_id}")  # + its now orphaned annotation
    else:
        records = (f"images[{position}]",) + tuple(f"annotation id={a['id']}" for a in item.anns)
    cases.append(Case("images entry id given as a string", "val", item.image_id, False, "not an integer", records))

    item = writer.new_image()
    twin = writer.new_image(image_id=item.image_id, file_name=f"{item.image_id:012d}_twin.jpg")
    writer.drop_annotations(twin)
    rejected("two images entries with one id", item, "repeats image id", f"image_id={item.image_id}")

    item = writer.new_image()
    writer.drop_entry(item)
    if writer.layout == "panoptic":
        rejected("annotation of an image id not in 'images'", item, "no matching entry in 'images'",
                 f"image_id={item.image_id}")
    else:
        cases.append(Case("annotation of an image id not in 'images'", "val", item.image_id, False,
                          f"image id {item.image_id} has no usable entry in 'images'",
                          tuple(f"annotation id={a['id']}" for a in item.anns)))

    item = writer.new_image()
    writer.drop_annotations(item)
    if writer.layout == "panoptic":
        rejected("image without annotation", item, "image has no panoptic annotation", f"image_id={item.image_id}")
    else:
        accepted("image without annotation", item)

    # decodable in an unusual form: converted to RGB
    item = writer.new_image()
    Image.fromarray(pixels).save(item.image_path, format="PNG")
    accepted("PNG data in a .jpg file", item)

    item = writer.new_image()
    Image.fromarray(pixels).convert("CMYK").save(item.image_path, format="JPEG")
    accepted("CMYK JPEG", item)

    item = writer.new_image()
    Image.fromarray(pixels).convert("L").save(item.image_path, format="JPEG")
    accepted("grayscale JPEG", item)

    item = writer.new_image()
    _replace_suffix(writer, item, ".png")
    gray16 = np.asarray(Image.fromarray(pixels).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(item.image_path)
    accepted("16-bit grayscale PNG", item)

    item = writer.new_image()
    _replace_suffix(writer, item, ".png")
    Image.fromarray(pixels).convert("RGBA").save(item.image_path)
    accepted("RGBA PNG", item)

    item = writer.new_image()
    _replace_suffix(writer, item, ".png")
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(item.image_path, transparency=0)
    accepted("palette PNG with a transparent colour", item)

    item = writer.new_image()
    item.image_path.write_bytes(item.image_path.read_bytes() + b"\x00trailing bytes after the JPEG end marker")
    accepted("JPEG with bytes after its end", item)

    item = writer.new_image(file_name="photo été 01 (copy).jpg")
    accepted("file name with spaces and non-ASCII", item)

    item = writer.new_image(file_name="extra/nested.jpg")
    accepted("file_name in a subfolder", item)

    # one id in both splits: each split is judged on its own (the val copy is broken here)
    train = writer.new_image("train")
    val = writer.new_image("val", image_id=train.image_id)
    val.image_path.unlink()
    cases.append(Case("image id in train and val: the good copy", "train", train.image_id, True))
    cases.append(Case("image id in train and val: the broken copy", "val", val.image_id, False,
                      "file does not exist", (f"val2017/{val.name}",)))
    return cases


def _panoptic_cases(writer: _Writer, real: Path | None) -> list[Case]:
    cases = []

    def rejected(kind, item, reason, *records):
        cases.append(Case(kind, item.split, item.image_id, False, reason, records or (f"image_id={item.image_id}",)))

    def accepted(kind, item):
        cases.append(Case(kind, item.split, item.image_id, True))

    def segments(item):
        return item.anns[0]["segments_info"]

    item = writer.new_image()
    segments(item)[0]["category_id"] = 4242
    rejected("unknown category_id", item, "unknown category id 4242")

    item = writer.new_image()
    second = copy.deepcopy(item.anns[0])
    writer.data["val"]["annotations"].append(second)
    rejected("two annotations for one image", item, "2 panoptic annotations")

    item = writer.new_image()
    del segments(item)[1]["bbox"]
    rejected("segment without bbox", item, "missing key(s) 'bbox'")

    item = writer.new_image()
    segments(item)[1]["id"] = segments(item)[0]["id"]
    rejected("repeated segment id", item, "repeats segment id")

    item = writer.new_image()
    segments(item)[0]["id"] = 0
    rejected("segment id 0 (the void colour)", item, "0 is void")

    item = writer.new_image()
    segments(item)[0]["bbox"][2] = -5.0
    rejected("negative bbox width or height", item, "negative width or height")

    item = writer.new_image()
    segments(item)[0]["bbox"][1] = float("nan")
    rejected("NaN in bbox", item, "not 4 finite numbers")

    item = writer.new_image()
    segments(item)[0]["area"] = float("nan")
    rejected("NaN area", item, "area nan")

    item = writer.new_image()
    item.anns[0]["segments_info"] = None
    rejected("segments_info null", item, "segments_info is a NoneType")

    item = writer.new_image()
    position = writer.data["val"]["annotations"].index(item.anns[0])
    del item.anns[0]["file_name"]
    rejected("annotation without file_name", item, "missing key(s) 'file_name'", f"annotations[{position}]",
             f"image_id={item.image_id}")

    item = writer.new_image()
    del segments(item)[-1:]  # its pixels stay in the PNG
    rejected("PNG colour missing from segments_info", item, "is not in the annotation's segments_info",
             item.png_path.name)

    item = writer.new_image()
    segments(item).append(dict(segments(item)[0], id=999_999))
    rejected("segment missing from the PNG", item, "no pixel in the PNG", item.png_path.name)

    item = writer.new_image()
    item.png_path.unlink()
    rejected("missing panoptic PNG", item, "file does not exist", item.png_path.name)

    item = writer.new_image()
    item.png_path.write_text("not a PNG")
    rejected("panoptic PNG that is not an image", item, "not an image file", item.png_path.name)

    item = writer.new_image()
    ids = np.asarray(Image.open(item.png_path).convert("RGB"))
    Image.fromarray(ids[:-4]).save(item.png_path)
    rejected("panoptic PNG size differs from the JSON", item, "differs from the annotation's", item.png_path.name)

    item = writer.new_image()
    Image.open(item.png_path).convert("L").save(item.png_path)
    rejected("grayscale panoptic PNG", item, "must be RGB", item.png_path.name)

    item = writer.new_image()
    Image.open(item.png_path).convert("RGBA").save(item.png_path)
    accepted("RGBA panoptic PNG", item)

    item = writer.new_image()
    segments(item)[0]["iscrowd"] = 1
    accepted("crowd segment", item)

    item = writer.new_image()
    height, width = item.entry["height"], item.entry["width"]
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(item.png_path)
    item.anns[0]["segments_info"] = []
    accepted("all-void PNG with empty segments_info", item)

    item = writer.new_image()
    segments(item)[0]["area"] += 7
    accepted("segment area disagreeing with the PNG", item)

    if real is not None:  # a real COCO image with its real PNG and segments (a crowd among them)
        samples = real / "coco-samples"
        data = json.loads((samples / "panoptic_val2017.json").read_text())
        writer.add_categories("val", data["categories"])
        image = data["images"][0]
        ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
        item = writer.new_image(file_name=image["file_name"])
        shutil.copyfile(samples / "val2017" / image["file_name"], item.image_path)
        shutil.copyfile(samples / "panoptic_val2017" / ann["file_name"], item.png_path)
        item.entry.update(height=image["height"], width=image["width"])
        item.anns[0]["segments_info"] = copy.deepcopy(ann["segments_info"])
        accepted("real COCO image with its real annotation", item)
    return cases


def _instances_cases(writer: _Writer, real: Path | None) -> list[Case]:
    cases = []

    def rejected(kind, item, reason, ann=None):
        ann = ann if ann is not None else item.anns[0]
        cases.append(Case(kind, item.split, item.image_id, False, reason,
                          (f"annotation id={ann['id']}", f"image_id={item.image_id}")))

    def accepted(kind, item):
        cases.append(Case(kind, item.split, item.image_id, True))

    def polygon_ann(item):
        return next(a for a in item.anns if isinstance(a["segmentation"], list))

    height, width = writer.templates["val"]["height"], writer.templates["val"]["width"]

    item = writer.new_image()
    item.anns[0]["category_id"] = 4242
    rejected("unknown category_id", item, "unknown category id 4242")

    item = writer.new_image()
    del item.anns[0]["segmentation"]
    rejected("annotation without segmentation", item, "missing key(s) 'segmentation'")

    item = writer.new_image()
    item.anns[0]["segmentation"] = None
    rejected("segmentation null", item, "segmentation is a NoneType")

    item = writer.new_image()
    item.anns[0]["segmentation"] = []
    rejected("empty polygon list", item, "empty polygon list")

    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"][0] = ann["segmentation"][0][:-1]
    rejected("odd-length polygon", item, "even number", ann)

    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    rejected("polygon of two points", item, "(>= 6) of coordinates", ann)

    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"][0][3] = float("nan")
    rejected("NaN polygon coordinate", item, "not a finite number", ann)

    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"][0][0] = 1e30
    rejected("polygon vertex far outside the image", item, "far outside", ann)

    item = writer.new_image()
    item.anns[0]["segmentation"] = {"size": [height * 2, width], "counts": [0, height * 2 * width]}
    rejected("RLE of the wrong size", item, "differs from the image's")

    item = writer.new_image()
    item.anns[0]["segmentation"] = {"size": [height, width], "counts": [0, 5]}
    rejected("RLE runs shorter than the image", item, "runs cover 5 pixels")

    item = writer.new_image()
    item.anns[0]["segmentation"] = {"size": [height, width], "counts": "0<0x~~"}
    rejected("malformed compressed RLE string", item, "counts string is malformed")

    item = writer.new_image()
    item.anns[0]["bbox"][3] = -2.0
    rejected("negative bbox width or height", item, "negative width or height")

    item = writer.new_image()
    item.anns[0]["bbox"][0] = float("nan")
    rejected("NaN in bbox", item, "not 4 finite numbers")

    item = writer.new_image()
    item.anns[0]["area"] = float("nan")
    rejected("NaN area", item, "area nan")

    item = writer.new_image()
    del item.anns[0]["bbox"]
    rejected("annotation without bbox", item, "missing key(s) 'bbox'")

    item = writer.new_image()
    item.anns[0]["iscrowd"] = 2
    rejected("iscrowd 2", item, "iscrowd 2 is not 0 or 1")

    item = writer.new_image()
    other = writer.new_image()
    other.anns[0]["id"] = item.anns[0]["id"]
    cases.append(Case("repeated annotation id", "val", item.image_id, False, "repeats annotation id",
                      (f"annotation id={item.anns[0]['id']}", f"image_id={item.image_id}")))
    cases.append(Case("repeated annotation id", "val", other.image_id, False, "unusable instance annotation",
                      (f"image_id={other.image_id}",)))

    item = writer.new_image()
    item.anns[0]["image_id"] = str(item.image_id)
    rejected("annotation image_id given as a string", item, "not an integer")

    # valid, if unusual
    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"] = [[2.0, 2.0, 10.0, 10.0, 20.0, 20.0]]  # collinear: no pixel
    accepted("zero-area polygon", item)

    item = writer.new_image()
    ann = polygon_ann(item)
    ann["segmentation"][0][0] = width + 3.5
    accepted("polygon vertex slightly outside the image", item)

    item = writer.new_image()
    mask = np.zeros((height, width), dtype=bool)
    mask[2:9, 3:12] = True
    item.anns[0].update(iscrowd=1, segmentation=mask_to_rle(mask, compressed=False))
    accepted("crowd region as uncompressed RLE", item)

    item = writer.new_image()
    for ann in item.anns:
        del ann["iscrowd"]
    accepted("annotation without iscrowd", item)

    if real is not None:  # a real COCO image with all its real annotations, a crowd RLE among them
        tiny = real / "coco-tiny"
        data = json.loads((tiny / "annotations" / "instances_val2017.json").read_text())
        writer.add_categories("val", data["categories"])
        crowd_image = next(a["image_id"] for a in data["annotations"] if a["iscrowd"])
        image = next(i for i in data["images"] if i["id"] == crowd_image)
        item = writer.new_image(file_name=image["file_name"])
        shutil.copyfile(tiny / "val2017" / image["file_name"], item.image_path)
        item.entry.update(height=image["height"], width=image["width"])
        writer.drop_annotations(item)
        for ann in data["annotations"]:
            if ann["image_id"] == crowd_image:
                item.anns.append(dict(ann, id=writer.new_annotation_id(), image_id=item.image_id))
        writer.data["val"]["annotations"].extend(item.anns)
        accepted("real COCO image with its real annotation", item)
    return cases


def build_corpus(base: Path, out: Path, layout: str, real: Path | None = None) -> Corpus:
    """Copy the clean dataset ``base`` to ``out`` and add the corpus of ``layout`` to it.

    Args:
        base: a clean ``write_synthetic_dataset`` tree (left untouched).
        real: the shared data folder (``coco-samples``, ``coco-tiny``), or None to leave
            out the kinds that use real COCO files.
    """
    from pading.data.synthetic import synthetic_table

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    out = Path(out)
    shutil.copytree(base, out)
    unseen = set(synthetic_table().unseen_ids)
    writer = _Writer(out, layout, unseen)
    clean_ids, clean_seen_only = {}, {}
    for split in SPLITS:
        clean_ids[split] = sorted(i["id"] for i in writer.data[split]["images"])
        if layout == "panoptic":
            categories = {a["image_id"]: {s["category_id"] for s in a["segments_info"]}
                          for a in writer.data[split]["annotations"]}
        else:
            categories = {}
            for ann in writer.data[split]["annotations"]:
                categories.setdefault(ann["image_id"], set()).add(ann["category_id"])
        clean_seen_only[split] = [i for i in clean_ids[split] if not categories.get(i, set()) & unseen]
    cases = _image_file_cases(writer, real)
    cases += _panoptic_cases(writer, real) if layout == "panoptic" else _instances_cases(writer, real)
    writer.save()
    return Corpus(out, layout, cases, clean_ids, clean_seen_only)


def check_outcome(corpus: Corpus, manifest_ids: dict[str, set[int]], rejects: list[dict]) -> list[str]:
    """What a run's manifest and rejects get wrong about the corpus (empty when all is right):
    a manifest other than :meth:`Corpus.expected_ids`, a rejected case no reject names with
    its reason, or a reject that no case explains (a clean image lost)."""
    problems = []
    for split in SPLITS:
        expected = corpus.expected_ids(split)
        if manifest_ids[split] != expected:
            problems.append(f"{split} manifest: missing {sorted(expected - manifest_ids[split])}, "
                            f"unexpected {sorted(manifest_ids[split] - expected)}")

    def names(reject: dict, record: str) -> bool:  # the record key itself, or the file at the end of the source
        return record == reject["key"] or reject["source"].endswith("/" + record)

    for case in corpus.cases:
        if case.accepted:
            continue
        if not any(names(r, case.records[0]) and case.reason in r["reason"] for r in rejects):
            problems.append(f"{corpus.layout} {case.kind!r}: no reject names {case.records[0]!r} with "
                            f"reason {case.reason!r}")
    explained = [record for case in corpus.cases if not case.accepted for record in case.records]
    for reject in rejects:
        if not any(names(reject, record) for record in explained):
            problems.append(f"unexplained reject {reject}")
    return problems


if __name__ == "__main__":  # pragma: no cover - a corpus to look at by hand
    import logging

    from pading.data import write_synthetic_dataset

    logging.basicConfig(level=logging.INFO)
    target = Path(sys.argv[1])
    chosen = sys.argv[2:] or list(LAYOUTS)
    write_synthetic_dataset(target / "clean", num_train=6, num_val=6, image_size=32, seed=0)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    for name in chosen:
        built = build_corpus(target / "clean", target / name, name, shared if shared.is_dir() else None)
        sys.stdout.write(f"{built.root}: {len(built.cases)} cases, {len(built.kinds())} kinds\n")
