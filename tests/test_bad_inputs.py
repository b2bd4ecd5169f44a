"""The bad-input corpus (tests/helpers/bad_corpus.py, docs/bad_inputs.md) through the readers,
the per-image validation and the real prepare stage, in the panoptic and instances layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.bad_corpus import LAYOUTS, build_corpus, check_outcome
from PIL import Image
from pycocotools import mask as mask_utils

from pading.config import load_config
from pading.data import decode_segmentation, load_image
from pading.data.coco import _rle_string_total
from pading.data.manifest import class_table_for, read_split_index, to_rows, validate_rows
from pading.errors import AnnotationError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
DOC = REPO / "docs" / "bad_inputs.md"
MIN_KINDS = 20


@pytest.fixture(scope="module")
def real_data(request) -> Path | None:
    """The shared real COCO data, or None: the corpus then leaves out the kinds made of real files."""
    try:
        return request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def clean_base(tmp_path_factory) -> Path:
    from pading.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bad_inputs") / "clean"
    write_synthetic_dataset(root, num_train=6, num_val=6, image_size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def corpora(clean_base, real_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("corpus")
    return {layout: build_corpus(clean_base, out / layout, layout, real_data) for layout in LAYOUTS}


def _config(corpus, *extra: str):
    return load_config(SMOKE, [f"data.root={corpus.root}", f"data.format={corpus.layout}", *extra])


def _doc_rows() -> list[dict]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[2] in ("accepted", "rejected"):
            rows.append({"kind": cells[0], "layout": cells[1], "decision": cells[2]})
    return rows


# ---- the corpus itself ---------------------------------------------------------------------
def test_corpus_has_enough_kinds_with_one_decision_each(corpora, real_data):
    for layout, corpus in corpora.items():
        kinds = corpus.kinds()
        assert len(kinds) >= MIN_KINDS, (layout, len(kinds))
        for kind in kinds:
            assert len({c.accepted for c in corpus.cases if c.kind == kind}) == 1, (layout, kind)
        assert any(c.accepted for c in corpus.cases) and any(not c.accepted for c in corpus.cases)
        if real_data is not None:
            assert "real COCO image with its real annotation" in kinds
        clean = corpus.clean_ids
        assert len(clean["train"]) == 6 and len(clean["val"]) == 6
        assert not {c.image_id for c in corpus.cases} & set(clean["train"] + clean["val"])  # clean part untouched


def test_doc_table_lists_every_kind_with_its_decision(corpora, real_data):
    rows = _doc_rows()
    assert len(rows) >= 2 * MIN_KINDS
    for layout, corpus in corpora.items():
        for case in corpus.cases:
            matching = [r for r in rows if r["kind"] == case.kind and r["layout"] in (layout, "both")]
            assert len(matching) == 1, (layout, case.kind, matching)
            assert matching[0]["decision"] == ("accepted" if case.accepted else "rejected"), (layout, case.kind)
    for row in rows:  # and nothing in the table that the corpus does not build
        layouts = LAYOUTS if row["layout"] == "both" else (row["layout"],)
        if real_data is None and row["kind"].startswith("real COCO"):
            continue
        for layout in layouts:
            assert row["kind"] in corpora[layout].kinds(), (row, layout)


# ---- readers and per-image validation (no Ray) ------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_readers_and_validation_sort_the_corpus(corpora, layout):
    corpus = corpora[layout]
    config = _config(corpus)
    table, manifest_ids, rejects = None, {}, []
    for split in ("train", "val"):
        records, categories, reader_rejects = read_split_index(config.data, split)
        table = table or class_table_for(config.data, categories)
        good, bad = validate_rows(to_rows(records, table), table, layout)
        rejects += [r.to_row() for r in reader_rejects] + bad
        manifest_ids[split] = {r["image_id"] for r in good if split == "val" or not r["has_unseen"]}
    assert check_outcome(corpus, manifest_ids, rejects) == []
    for split in ("train", "val"):  # every clean image is still there, counted
        kept = {i for i in corpus.clean_ids[split] if i in manifest_ids[split]}
        expected = corpus.clean_seen_only[split] if split == "train" else corpus.clean_ids[split]
        assert len(kept) == len(expected) > 0
    assert all(r["reason"] and (r["source"] or r["key"]) for r in rejects)


def test_unusual_images_decode_to_the_template_pixels(corpora):
    corpus = corpora["panoptic"]
    by_kind = {c.kind: c for c in corpus.cases}
    config = _config(corpus)
    records = {r.image_id: r for r in read_split_index(config.data, "val")[0]}
    png_as_jpg = load_image(records[by_kind["PNG data in a .jpg file"].image_id].image_path)
    template = png_as_jpg.astype(int)  # lossless: the template's decoded pixels
    assert png_as_jpg.shape == (32, 32, 3) and png_as_jpg.dtype == np.uint8
    np.testing.assert_array_equal(load_image(records[by_kind["RGBA PNG"].image_id].image_path), png_as_jpg)
    gray = np.asarray(Image.fromarray(png_as_jpg).convert("L")).astype(int)
    grayscale = load_image(records[by_kind["grayscale JPEG"].image_id].image_path).astype(int)
    sixteen = load_image(records[by_kind["16-bit grayscale PNG"].image_id].image_path).astype(int)
    for image in (grayscale, sixteen):  # three equal channels
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert np.abs(grayscale[..., 0] - gray).mean() < 12  # JPEG-lossy
    # 16-bit: stored as gray * 257, read back by the fixed factor 255 / 65535 (to_rgb): gray again
    assert np.abs(sixteen[..., 0] - gray).max() <= 1
    cmyk = load_image(records[by_kind["CMYK JPEG"].image_id].image_path).astype(int)
    assert np.abs(cmyk - template).mean() < 12  # JPEG-lossy, but the same picture in RGB
    palette = load_image(records[by_kind["palette PNG with a transparent colour"].image_id].image_path)
    assert palette.shape == (32, 32, 3) and np.abs(palette.astype(int) - template).mean() < 20


# ---- the segmentation checks that keep pycocotools from hanging or reading garbage -----------------
@pytest.mark.parametrize("segmentation, message", [
    ([[0, 0, float("nan"), 1, 2, 2]], "not a finite number"),
    ([[0, 0, 1e30, 1, 2, 2]], "far outside"),
    ([[0, 0, -1e9, 1, 2, 2]], "far outside"),
    ({"size": [4, 4], "counts": [0, 3]}, "runs cover 3 pixels, not 4x4 = 16"),
    ({"size": [4, 4], "counts": [-5, 21]}, "non-negative integers"),
    ({"size": [4, 4], "counts": [1.5, 14.5]}, "non-negative integers"),
    ({"size": [4, 4], "counts": "0<0x"}, "malformed"),
    ('{"size": [4, 4], "counts": [0, 16', "not valid JSON"),
])
def test_decode_segmentation_refuses_what_pycocotools_mishandles(segmentation, message):
    with pytest.raises(AnnotationError, match=re.escape(message)) as info:
        decode_segmentation(segmentation, 4, 4, source="image_id=7 annotation id=3")
    assert info.value.source == "image_id=7 annotation id=3"
    assert decode_segmentation([[0, 0, 4.5, 0, 4.5, 4.5, 0, 4.5]], 4, 4).all()  # slightly outside: clipped


def test_rle_string_total_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = rng.random((height, width)) < rng.random()
        if trial % 7 == 0:
            mask[:] = trial % 2 == 0
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert _rle_string_total(rle["counts"].decode("ascii")) == height * width
        decoded = decode_segmentation({"size": [height, width], "counts": rle["counts"].decode("ascii")}, height, width)
        np.testing.assert_array_equal(decoded, mask)


# ---- the real prepare stage, through Ray Data ----------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    """Ray for this module: one already running in this session (the Serve tests') is reused
    and left running; otherwise a 2-CPU local one is started and shut down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    options = dict(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    try:
        ray.init(**options)
    except Exception as err:  # Ray waits a fixed 30 s for its raylet; a busy shared machine can miss that once
        if "timed out during startup" not in str(err):
            raise
        ray.shutdown()
        ray.init(**options)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepare_stage_completes_and_accounts_for_every_item(corpora, layout, ray_local, tmp_path, monkeypatch):
    """The corpus through the real prepare stage: validated in the driver (a small input), and
    through Ray Data's pool of validation actors (up to two, as for a large input), which must
    write the same manifest and rejects."""
    from pipelines import prepare

    corpus = corpora[layout]
    output = tmp_path / "out"
    info = prepare.run(_config(corpus, f"output_dir={output}"), output)
    manifest = output / "manifest"
    assert prepare.validation_actors(len(corpus.cases), 1) == 0  # it ran in the driver
    monkeypatch.setattr(prepare, "VALIDATION_IMAGES_PER_ACTOR", 1)  # a pool of up to two actors for this input
    on_ray = tmp_path / "on-ray"
    again = prepare.run(_config(corpus, f"output_dir={on_ray}", "ray.extract_concurrency=1"), on_ray)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in info.items() if k != "seconds"}
    for split in ("train", "val", "rejects.parquet"):
        ours, theirs = (sorted(pq.read_table(root / "manifest" / split).to_pylist(),
                               key=lambda row: json.dumps(row, sort_keys=True, default=str)) for root in (output, on_ray))
        assert ours == theirs and ours, split
    assert (manifest / "_SUCCESS.json").is_file()
    manifest_ids = {split: {r["image_id"] for r in pq.read_table(manifest / split).to_pylist()}
                    for split in ("train", "val")}
    rejects = pq.read_table(manifest / "rejects.parquet").to_pylist()
    assert check_outcome(corpus, manifest_ids, rejects) == []
    counts = json.loads((manifest / "_SUCCESS.json").read_text())["counts"]
    assert info["counts"] == counts
    expected_val = corpus.expected_ids("val")
    assert counts["val"]["images"] == len(expected_val) == len(manifest_ids["val"])
    assert set(corpus.clean_ids["val"]) <= manifest_ids["val"]  # every clean val image, counted above
    assert set(corpus.clean_seen_only["train"]) <= manifest_ids["train"]
    # the good train copy of an id whose val copy is broken is not charged with the val reject
    shared = next(c.image_id for c in corpus.cases if c.kind == "image id in train and val: the good copy")
    assert shared in manifest_ids["train"] and shared not in manifest_ids["val"]
