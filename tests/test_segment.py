"""Batch segmentation of image collections: the input listing and the shard worker
(pading.serving.inputs / batch, no Ray), and ``python pipelines/segment.py`` end to end
on real COCO images through one shared local Ray (marked slow)."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from helpers.tiny_bundle import build_tiny_bundle
from PIL import Image

from pading.bundle import CLASSES_FILE, CONFIG_FILE
from pading.classes import ClassTable
from pading.config import ExperimentConfig
from pading.errors import ConfigError
from pading.evaluation.inference import rgb_to_ids
from pading.io import write_json_atomic
from pading.serving import batch
from pading.serving.inputs import (
    FileTooLargeError,
    InputError,
    MissingImageError,
    glob_regex,
    list_inputs,
    read_image_bytes,
)

REPO = Path(__file__).resolve().parents[1]
NUM_REAL = 10


def _jpeg(path: Path, size=(24, 16), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


# ---- input listing -----------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    """a/x.jpg, a/b/y.PNG, a/b/z.webp, a/b/notes.txt, a/.hidden/h.jpg, a/.dot.jpg"""
    root = tmp_path / "tree"
    _jpeg(root / "a" / "x.jpg")
    Image.new("RGB", (4, 4)).save(_dir(root / "a" / "b") / "y.PNG")
    Image.new("RGB", (4, 4)).save(root / "a" / "b" / "z.webp", format="WEBP")
    (root / "a" / "b" / "notes.txt").write_text("not an image")
    _jpeg(root / "a" / ".hidden" / "h.jpg")
    _jpeg(root / "a" / ".dot.jpg")
    return root


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_folder_lists_images_recursively_sorted_without_hidden_files(tree):
    found = list_inputs(str(tree))
    assert found == [str(tree / "a" / "b" / "y.PNG"), str(tree / "a" / "b" / "z.webp"), str(tree / "a" / "x.jpg")]


def test_globs_match_one_folder_or_many(tree):
    assert list_inputs(str(tree / "a" / "*.jpg")) == [str(tree / "a" / "x.jpg")]
    assert list_inputs(str(tree / "**" / "*.jpg")) == [str(tree / "a" / "x.jpg")]
    everything = list_inputs(str(tree / "a" / "b" / "*"))  # a glob keeps what it matches, images or not
    assert [Path(p).name for p in everything] == ["notes.txt", "y.PNG", "z.webp"]
    assert glob_regex("**/*.jpg").match("x.jpg") and glob_regex("**/*.jpg").match("a/b/x.jpg")
    assert not glob_regex("*.jpg").match("a/x.jpg") and glob_regex("[!a]?.png").match("bc.png")


def test_text_list_resolves_relative_paths_next_to_it(tree, tmp_path):
    listing = tree / "list.txt"
    listing.write_text("# photos\na/x.jpg\n\n  a/b/y.PNG  \n/elsewhere/abs.jpg\na/x.jpg\n")
    assert list_inputs(str(listing)) == ["/elsewhere/abs.jpg", str(tree / "a" / "b" / "y.PNG"), str(tree / "a" / "x.jpg")]


def test_parquet_and_csv_columns(tree):
    pq.write_table(pa.table({"id": [1, 2, 3], "path": ["a/x.jpg", None, "s3://bucket/k.jpg"]}), tree / "t.parquet")
    assert list_inputs(str(tree / "t.parquet")) == [str(tree / "a" / "x.jpg"), "s3://bucket/k.jpg"]
    (tree / "t.csv").write_text("image,label\na/b/z.webp,1\n,2\n")
    assert list_inputs(str(tree / "t.csv"), column="image") == [str(tree / "a" / "b" / "z.webp")]
    with pytest.raises(InputError, match=r"no column 'path' \(columns: image, label\).*--input-column"):
        list_inputs(str(tree / "t.csv"))


def test_uris_go_through_pyarrow_filesystems(tree):
    uri = f"file://{tree}"
    assert list_inputs(uri) == [f"{uri}/a/b/y.PNG", f"{uri}/a/b/z.webp", f"{uri}/a/x.jpg"]
    assert list_inputs(f"{uri}/a/*.jpg") == [f"{uri}/a/x.jpg"]
    assert read_image_bytes(f"{uri}/a/x.jpg", 1 << 20) == (tree / "a" / "x.jpg").read_bytes()


def test_bad_inputs_give_clear_errors(tree):
    with pytest.raises(InputError, match="no such file or folder"):
        list_inputs(str(tree / "missing"))
    with pytest.raises(InputError, match="folder .* does not exist"):
        list_inputs(str(tree / "nowhere" / "*.jpg"))
    with pytest.raises(InputError, match="no images found"):
        list_inputs(str(tree / "a" / "*.gif"))
    (tree / "data.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown kind of file '.bin'"):
        list_inputs(str(tree / "data.bin"))
    with pytest.raises(MissingImageError, match="no such file"):
        read_image_bytes(str(tree / "gone.jpg"), 100)
    with pytest.raises(FileTooLargeError, match="above the limit of 10"):
        read_image_bytes(str(tree / "a" / "x.jpg"), 10)
    # lists that cannot be read: named, not a traceback from the reader
    (tree / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match=r"broken.parquet: cannot be read \(Arrow"):
        list_inputs(str(tree / "broken.parquet"))
    (tree / "latin.txt").write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.txt: cannot be read \(UnicodeDecodeError"):
        list_inputs(str(tree / "latin.txt"))


def test_a_damaged_job_record_is_named_with_the_way_out(tmp_path):
    (tmp_path / batch.JOB_FILE).write_text('{"task": "pan')
    with pytest.raises(ConfigError, match=r"job.json cannot be read .*--force"):
        batch.check_output(tmp_path, {"task": "panoptic"}, force=False)
    assert batch.check_output(tmp_path, {"task": "panoptic"}, force=True) is False


# ---- vocabulary and the job record -------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bundle") / "tiny"
    build_tiny_bundle(directory)
    return directory


@pytest.fixture(scope="module")
def table(bundle_dir) -> ClassTable:
    return ClassTable.from_records(json.loads((bundle_dir / CLASSES_FILE).read_text()))


def test_class_names_are_parsed_and_checked(table, tmp_path):
    assert batch.parse_class_names(" teapot, lamp   post,,") == ["teapot", "lamp post"]
    (tmp_path / "names.txt").write_text("# extra\nteapot\n\nkite surfer\n")
    assert batch.merge_names(["Teapot"], batch.read_class_file(tmp_path / "names.txt")) == ["Teapot", "kite surfer"]
    preview = batch.preview_table(table, ["teapot"])
    assert batch.select_classes(preview, ["teapot", table[0].name]) == [max(table.ids) + 1, table[0].id]
    with pytest.raises(ConfigError, match="unknown class 'teapt'; close matches: 'teapot'"):
        batch.select_classes(preview, ["teapt"])
    with pytest.raises(ConfigError, match=f"vocabulary has {table.num_classes + 1} classes"):
        batch.select_classes(preview, ["quasar"])
    with pytest.raises(ConfigError, match="already in the vocabulary"):
        batch.preview_table(table, [table[0].name])


def test_a_relative_input_is_refused_under_ray_job_submit(bundle_dir, tmp_path, monkeypatch):
    """Under ``ray job submit`` the driver's working directory is a temporary copy that other
    nodes do not see: every image would be a 'missing' reject on them, and the job would still
    succeed. A relative ``--input`` is refused there, as a relative ``--output`` is."""
    from pading.run import batch_job

    monkeypatch.chdir(tmp_path)
    _jpeg(tmp_path / "images" / "a.jpg")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    args = batch_job.parse_args(["--bundle", str(bundle_dir), "--input", "images", "--output", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=r"--input='images' is a relative path"):
        batch_job.plan(args)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert batch_job.plan(args).shards[0]["paths"] == [str(tmp_path / "images" / "a.jpg")]


def test_an_output_refuses_another_vocabulary_request_unless_forced(tmp_path):
    config = ExperimentConfig()
    spec = batch.job_spec(bundle="b1", add_classes=["teapot"], only_classes=[], task="panoptic", paths=["/a.jpg"],
                          shard_size=4, config=config)
    assert batch.check_output(tmp_path, spec, force=False) is False
    write_json_atomic(tmp_path / batch.JOB_FILE, spec)
    (tmp_path / "keep.txt").write_text("not ours")
    assert batch.check_output(tmp_path, spec, force=False) is True  # the same job: resume
    other = {**spec, "add_classes": ["lamp post"]}
    with pytest.raises(ConfigError, match=r"different vocabulary request \(add_classes: \['teapot'\] -> "
                                          r"\['lamp post'\]\).*--force"):
        batch.check_output(tmp_path, other, force=False)
    assert batch.check_output(tmp_path, other, force=True) is False
    assert not (tmp_path / batch.JOB_FILE).exists() and (tmp_path / "keep.txt").exists()


# ---- the shard worker and the formats, in process ----------------------------------------


@pytest.fixture(scope="module")
def small_job(bundle_dir, tmp_path_factory) -> dict:
    """Three synthetic images, a truncated JPEG, a text file named .jpg and a missing file,
    segmented in two shards by ShardSegmenter in this process (task all)."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    images = []
    for k, size in enumerate([(40, 30), (32, 48), (300, 280)]):
        path = root / "in" / f"img{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(path)
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full, format="JPEG")
    (root / "in" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "in" / "notes.jpg").write_text("a text file")
    paths = [str(p) for p in images] + [str(root / "in" / n) for n in ("truncated.jpg", "notes.jpg", "gone.jpg")]
    output = root / "out"
    output.mkdir()
    table = batch.prepare_bundle(bundle_dir, output, _bundle_config(bundle_dir), ["teapot"], reuse=False)
    worker = batch.ShardSegmenter(str(output / "bundle"), str(output), "all", read_threads=2, batch_size=2)
    shards = batch.plan_shards(paths, 4)
    counts = [worker.segment_shard(s["shard"], s["paths"], s["image_ids"]) for s in shards]
    return {"output": output, "shards": shards, "counts": counts, "worker": worker, "table": table, "paths": paths}


def _bundle_config(bundle_dir: Path):
    from pading.config import load_config

    return load_config(bundle_dir / CONFIG_FILE)


def test_shards_hold_segments_and_rejects_with_reasons(small_job):
    output, shards = small_job["output"], small_job["shards"]
    assert [s["image_ids"] for s in shards] == [[1, 2, 3, 4], [5, 6]]  # ids follow the sorted paths
    images = pa.concat_tables([pq.read_table(batch.shard_files(output, s["shard"])[1]) for s in shards]).to_pylist()
    by_name = {Path(r["path"]).name: r for r in images}
    assert by_name["gone.jpg"]["kind"] == "missing"
    assert by_name["notes.jpg"]["kind"] == "corrupt" and "not a JPEG" in by_name["notes.jpg"]["reason"]
    assert by_name["truncated.jpg"]["kind"] == "truncated" and "truncated" in by_name["truncated.jpg"]["reason"]
    assert by_name["img2.png"]["status"] == "ok" and (by_name["img2.png"]["width"], by_name["img2.png"]["height"]) == \
        (300, 280)
    segments = pq.read_table(batch.shard_files(output, 0)[0])
    assert set(segments["task"].to_pylist()) == {"panoptic", "instance", "semantic"}
    assert sum(c["segments"] for c in small_job["counts"]) == segments.num_rows + \
        pq.read_table(batch.shard_files(output, 1)[0]).num_rows
    again = small_job["worker"].segment_shard(0, shards[0]["paths"], shards[0]["image_ids"])
    assert again["skipped"] and again["segments"] == small_job["counts"][0]["segments"]


def test_an_image_the_model_fails_on_is_a_reject_and_its_batch_goes_on(bundle_dir, tmp_path):
    """A failure after decoding (the model, post-processing, a file write) is isolated image by
    image: the failing image becomes a ``failed`` reject naming the error, its batch-mates are
    segmented once each, and the shard is finished."""
    rng = np.random.default_rng(1)
    paths = []
    for k, width in enumerate([40, 33, 48]):  # the 33-px-wide one breaks the "model"
        path = tmp_path / "in" / f"img{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    output = tmp_path / "out"
    output.mkdir()
    batch.prepare_bundle(bundle_dir, output, _bundle_config(bundle_dir), [], reuse=False)
    worker = batch.ShardSegmenter(str(output / "bundle"), str(output), "instance", read_threads=1, batch_size=2)
    real_segment, calls = worker.service.segment, []

    def segment(images, *args, **kwargs):
        calls.append(len(images))
        if any(image.shape[1] == 33 for image in images):
            raise RuntimeError("the model broke on this image")
        return real_segment(images, *args, **kwargs)

    worker.service.segment = segment
    counts = worker.segment_shard(0, paths, [1, 2, 3])
    assert calls == [2, 1, 1, 1]  # the failed pair again one by one, then the last image
    assert (counts["segmented"], counts["rejected"]) == (2, 1)
    images = {Path(r["path"]).name: r for r in pq.read_table(batch.shard_files(output, 0)[1]).to_pylist()}
    assert images["img1.png"]["status"] == "rejected" and images["img1.png"]["kind"] == "failed"
    assert "RuntimeError: the model broke on this image" in images["img1.png"]["reason"]
    assert images["img0.png"]["status"] == images["img2.png"]["status"] == "ok"
    segments = pq.read_table(batch.shard_files(output, 0)[0]).to_pylist()
    alone = real_segment([np.asarray(Image.open(paths[0]).convert("RGB"))], "instance", "json")[0]["instance"]
    assert sum(r["image_id"] == 1 for r in segments) == len(alone)  # once, not once per attempt
    assert {r["image_id"] for r in segments} <= {1, 3}


def test_every_format_is_assembled_from_the_shards(small_job):
    from pycocotools.coco import COCO

    output, table = small_job["output"], small_job["table"]
    categories = batch.coco_categories(table)
    assert categories[-1]["name"] == "teapot" and categories[-1]["added"] and categories[-1]["unseen"]
    ids = {c["id"] for c in categories}
    counts = batch.assemble(output, "parquet", "all", 2, categories)
    assert (counts["segmented"], counts["rejected"]) == (3, 3)
    rows = pq.read_table(output / "segments.parquet")
    assert rows.num_rows == counts["segments"] and set(rows["class_id"].to_pylist()) <= ids
    rejects = pacsv.read_csv(output / "rejects.csv").to_pylist()
    assert sorted(Path(r["file"]).name for r in rejects) == ["gone.jpg", "notes.jpg", "truncated.jpg"]

    batch.assemble(output, "coco-instance", "all", 2, categories)
    gt = COCO()
    gt.dataset = {**json.loads((output / "images.json").read_text()), "annotations": []}
    gt.createIndex()
    results = json.loads((output / "instances_results.json").read_text())
    detections = gt.loadRes(str(output / "instances_results.json"))
    ok_ids = [2, 3, 4]  # sorted paths: gone.jpg, img0.png, img1.png, img2.png, notes.jpg, truncated.jpg
    assert len(results) == len(detections.getAnnIds()) > 0 and sorted(gt.getImgIds()) == ok_ids

    batch.assemble(output, "coco-panoptic", "all", 2, categories)  # PNGs rendered from the masks
    panoptic = json.loads((output / "panoptic.json").read_text())
    assert [a["image_id"] for a in panoptic["annotations"]] == ok_ids
    for annotation in panoptic["annotations"]:
        png = rgb_to_ids(np.asarray(Image.open(output / "panoptic" / annotation["file_name"])))
        info = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(png)) - {0} == set(info)
        for segment_id, segment in info.items():
            assert int((png == segment_id).sum()) == segment["area"]

    batch.assemble(output, "semantic", "all", 2, categories)
    for image in json.loads((output / "images.json").read_text())["images"]:
        label = np.asarray(Image.open(output / "semantic" / batch.png_name(image["id"])))
        assert label.shape == (image["height"], image["width"]) and set(np.unique(label)) <= ids


def test_semantic_pngs_are_sixteen_bit_for_large_ids():
    segment = {"segment_id": 1, "class_id": 1203, "score": None, "rle_size": [2, 3],
               "rle_counts": _rle(np.ones((2, 3), dtype=bool))}
    png = Image.open(io.BytesIO(batch.render_png("semantic", [segment], 2, 3, sixteen_bit=True)))
    assert np.asarray(png).max() == 1203


def _rle(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def test_unknown_only_class_stops_before_anything_is_written(bundle_dir, tree, tmp_path, caplog):
    from pipelines import segment

    code = segment.main(["--bundle", str(bundle_dir), "--input", str(tree), "--output", str(tmp_path / "o"),
                         "--add-classes", "teapot", "--only-classes", "teapt"])
    assert code == 2 and "close matches: 'teapot'" in caplog.text
    assert not (tmp_path / "o" / batch.JOB_FILE).exists()


# ---- pipelines/segment.py on real COCO images, one shared Ray --------------------------------


@pytest.fixture(scope="module")
def corpus(coco_tiny, tmp_path_factory) -> dict:
    """NUM_REAL val images (two in a subfolder), a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("corpus") / "images"
    real = sorted((coco_tiny / "val2017").glob("*.jpg"))[:NUM_REAL]
    for k, path in enumerate(real):
        target = root / ("sub" if k < 2 else "") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    data = real[-1].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "readme.jpg").write_text("this is a text file, not a JPEG")
    return {"root": root, "real": NUM_REAL, "bad": {"truncated.jpg", "readme.jpg"}}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module's runs (each run joins it through RAY_ADDRESS)."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        except Exception as err:  # Ray waits a fixed 30 s for its raylet; a busy machine can miss that once
            if "timed out during startup" not in str(err):
                raise
            ray.shutdown()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _run(args: list[str], address: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=address, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "pipelines/segment.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:])
    return proc


def _summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


HELPERS_PROBE = """
import json, time
import ray
from pipelines import common
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
def names():
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True))
before = names()
common.shard_work([{"shard": 0}], whole_pool=False)  # a dataset built, nothing executed
deadline = time.time() + 60
while time.time() < deadline and not {"AutoscalingCoordinator", "datasets_stats_actor"} <= set(names()):
    time.sleep(0.2)
print(json.dumps({"before": before, "after": names()}))
"""


def test_ray_datas_helper_actors_start_before_the_first_shard():
    """Building the shards' dataset starts Ray Data's statistics actor and autoscaling
    coordinator, so that they start while the actor pool loads its models rather than
    during the first shards (docs/performance.md, "The per-image paths"). A fresh Ray of its
    own: on a Ray where Ray Data has run before they exist already."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", HELPERS_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert names["before"] == []
    assert {"AutoscalingCoordinator", "datasets_stats_actor"} <= set(names["after"])


@pytest.fixture(scope="module")
def parquet_run(corpus, bundle_dir, ray_address, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("parquet") / "out"
    args = ["--bundle", str(bundle_dir), "--input", str(corpus["root"]), "--output", str(output),
            "--add-classes", "teapot", "--shard-size", "4"]
    proc = _run(args, ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"output": output, "args": args, "proc": proc, "summary": _summary(proc)}


@pytest.mark.slow
def test_parquet_run_segments_the_images_and_rejects_the_bad_files(parquet_run, corpus):
    output, summary = parquet_run["output"], parquet_run["summary"]
    assert (summary["segmented"], summary["rejected"], summary["format"]) == (corpus["real"], 2, "parquet")
    rows = pq.read_table(output / "segments.parquet").to_pylist()
    assert len(rows) == summary["segments"] > 0 and {r["task"] for r in rows} == {"panoptic"}
    images = {r["image_id"]: r for r in pq.read_table(output / "images.parquet").to_pylist()}
    assert sorted(images) == list(range(1, corpus["real"] + 3))  # ids from the sorted list, every input
    assert all(images[r["image_id"]]["path"] == r["path"] and r["rle_size"] == [images[r["image_id"]]["height"],
               images[r["image_id"]]["width"]] for r in rows)
    assert {Path(r["path"]).name for r in rows} == {p.name for p in corpus["root"].rglob("*.jpg")} - corpus["bad"]
    rejects = pq.read_table(output / "rejects.parquet").to_pylist()
    assert {Path(r["file"]).name: r["kind"] for r in rejects} == {"truncated.jpg": "truncated", "readme.jpg": "corrupt"}
    assert all(r["reason"] for r in rejects) and len(pacsv.read_csv(output / "rejects.csv")) == 2
    categories = json.loads((output / "categories.json").read_text())
    teapot = [c for c in categories if c["name"] == "teapot"]
    assert teapot and teapot[0]["added"] and {"id", "name", "isthing", "supercategory", "unseen"} <= set(teapot[0])
    assert (output / batch.BUNDLE_DIR / CLASSES_FILE).is_file()
    assert "teapot" in (output / batch.BUNDLE_DIR / CLASSES_FILE).read_text()
    log = parquet_run["proc"].stderr
    assert "3 shards of 4, 3 to do" in log and "[3/3 shards]" in log and "images/s" in log


@pytest.mark.slow
def test_rerun_skips_finished_shards_and_adds_no_rows(parquet_run, ray_address):
    output = parquet_run["output"]
    before = pq.read_table(output / "segments.parquet").num_rows
    shard_times = {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()}
    proc = _run(parquet_run["args"], ray_address)
    assert proc.returncode == 0 and "0 to do" in proc.stderr
    assert pq.read_table(output / "segments.parquet").num_rows == before == _summary(proc)["segments"]
    assert {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()} == shard_times
    refused = _run([*parquet_run["args"][:-4], "--add-classes", "lamp post", "--shard-size", "4"], ray_address)
    assert refused.returncode == 2
    assert "different vocabulary request" in refused.stderr and "--force" in refused.stderr


@pytest.mark.slow
def test_coco_instance_results_load_with_pycocotools(corpus, bundle_dir, ray_address, tmp_path):
    from pycocotools.coco import COCO

    output = tmp_path / "out"
    proc = _run(["--bundle", str(bundle_dir), "--input", str(corpus["root"]), "--output", str(output),
                 "--format", "coco-instance", "--add-classes", "teapot", "--shard-size", "6"], ray_address)
    assert proc.returncode == 0
    gt = COCO()
    gt.dataset = {**json.loads((output / "images.json").read_text()), "annotations": []}
    gt.createIndex()
    assert len(gt.getImgIds()) == corpus["real"] and "teapot" in {c["name"] for c in gt.loadCats(gt.getCatIds())}
    detections = gt.loadRes(str(output / "instances_results.json"))
    results = json.loads((output / "instances_results.json").read_text())
    assert len(detections.getAnnIds()) == len(results) == _summary(proc)["segments"] > 0
    for annotation in detections.loadAnns(detections.getAnnIds()[:5]):
        image = gt.imgs[annotation["image_id"]]
        assert detections.annToMask(annotation).shape == (image["height"], image["width"])


@pytest.mark.slow
def test_coco_panoptic_pngs_match_their_segments(corpus, bundle_dir, ray_address, tmp_path):
    output = tmp_path / "out"
    proc = _run(["--bundle", str(bundle_dir), "--input", str(corpus["root"]), "--output", str(output),
                 "--format", "coco-panoptic", "--add-classes", "teapot", "--overlays", "--concurrency", "2"],
                ray_address)
    assert proc.returncode == 0
    panoptic = json.loads((output / "panoptic.json").read_text())
    assert len(panoptic["images"]) == len(panoptic["annotations"]) == corpus["real"]
    category_ids = {c["id"] for c in panoptic["categories"]}
    for annotation in panoptic["annotations"]:
        png = rgb_to_ids(np.asarray(Image.open(output / "panoptic" / annotation["file_name"]).convert("RGB")))
        info = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(png)) - {0} == set(info)
        assert all(int((png == i).sum()) == s["area"] and s["category_id"] in category_ids for i, s in info.items())
        assert (output / "overlays" / annotation["file_name"]).is_file()


@pytest.mark.slow
def test_only_classes_restricts_the_output(parquet_run, corpus, bundle_dir, ray_address, tmp_path):
    rows = pq.read_table(parquet_run["output"] / "segments.parquet").to_pylist()
    common_class = max({r["class_name"] for r in rows}, key=lambda n: sum(r["class_name"] == n for r in rows))
    output = tmp_path / "out"
    proc = _run(["--bundle", str(bundle_dir), "--input", str(corpus["root"]), "--output", str(output),
                 "--add-classes", "teapot", "--only-classes", f"{common_class},teapot"], ray_address)
    assert proc.returncode == 0
    kept = pq.read_table(output / "segments.parquet").to_pylist()
    assert kept and {r["class_name"] for r in kept} <= {common_class, "teapot"}
    assert len(kept) <= len(rows)


def test_steady_throughput_counts_each_actor_by_machine_and_process():
    """Two actors on two machines may have the same process id (containers): each keeps its
    own window; shards an earlier attempt finished count for nothing."""
    rows = [{"host": "a", "pid": 7, "images": 10, "skipped": False, "started_at": 0.0, "finished_at": 10.0},
            {"host": "b", "pid": 7, "images": 10, "skipped": False, "started_at": 100.0, "finished_at": 110.0},
            {"host": "b", "pid": 7, "images": 50, "skipped": True, "started_at": 110.0, "finished_at": 110.0}]
    assert batch.steady_throughput(rows) == pytest.approx(2.0)  # 1/s on each, not 20 images over 110 s


@pytest.mark.slow
@pytest.mark.parametrize("deaths", [1, 2])
def test_a_shard_whose_actor_dies_is_retried_a_bounded_number_of_times(deaths, corpus, bundle_dir, ray_address,
                                                                      tmp_path, monkeypatch):
    """An actor that dies on a shard (e.g. out of memory on a huge image) hands the shard to
    another attempt: one death costs nothing (every image is segmented once); an image that
    kills every attempt stops the job after SHARD_RETRIES retries with a message, not for ever."""
    from pading.errors import PadingError
    from pipelines import segment as segment_pipeline

    deaths_dir = tmp_path / "deaths"
    deaths_dir.mkdir()

    class DiesOnShardOne(segment_pipeline.SegmenterActor):  # defined here: Ray ships it by value
        def __call__(self, batch):
            if int(batch["shard"][0]) == 1 and len(list(deaths_dir.iterdir())) < deaths:
                (deaths_dir / str(os.getpid())).touch()
                os._exit(1)  # the process dies mid-task, as the kernel's OOM killer would end it
            return super().__call__(batch)

    monkeypatch.setattr(segment_pipeline, "SHARD_RETRIES", 1)  # 3 in use: one retry here saves two restarts
    monkeypatch.setattr(segment_pipeline, "segment_pending",
                        functools.partial(segment_pipeline.segment_pending, actor_class=DiesOnShardOne))
    output = tmp_path / "out"
    args = segment_pipeline.parse_args(["--bundle", str(bundle_dir), "--input", str(corpus["root"]),
                                        "--output", str(output), "--shard-size", "4"])
    if deaths > segment_pipeline.SHARD_RETRIES:
        with pytest.raises(PadingError, match=f"its {segment_pipeline.SHARD_RETRIES} retries ran out"):
            segment_pipeline.run(args)
        assert len(list(deaths_dir.iterdir())) == segment_pipeline.SHARD_RETRIES + 1
        assert not any(path.exists() for path in batch.shard_files(output, 1))  # the shard never finished
        return
    summary = segment_pipeline.run(args)
    assert len(list(deaths_dir.iterdir())) == 1
    assert (summary["segmented"], summary["rejected"]) == (corpus["real"], 2)
    rows = pq.read_table(output / "segments.parquet").to_pylist()
    assert {Path(r["path"]).name for r in rows} == {p.name for p in corpus["root"].rglob("*.jpg")} - corpus["bad"]
    keys = [(r["image_id"], r["segment_id"]) for r in rows]
    assert len(keys) == len(set(keys))  # the retried shard's images once each
