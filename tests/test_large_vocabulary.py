"""The large-vocabulary runs end to end (marked slow; run in CI):

- a short version of ``python pipelines/full.py --config configs/lvis_synthetic.yaml``: every
  stage and the LVIS evaluation over the 1,203 LVIS classes;
- past LVIS: the generator stage (Ray Train) over the LVIS names plus the ImageNet-21k names
  (> 20,000 classes, ``vocabulary.extra_unseen=imagenet21k``) on 2 workers (the short run above
  is the 1-worker generator stage; docs/lvis.md "Large vocabularies" times both at 22,325 classes),
  and the resulting bundle answering through the endpoint's service and ``pipelines/segment.py``;
- a chunk size that cannot fit is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pading.bundle import CLASSES_FILE

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lvis_synthetic.yaml"
SHORT = ["--set", "data.synthetic.num_train=120", "--set", "data.synthetic.num_val=30",
         "--set", "pretrain.iterations=40", "--set", "pretrain.checkpoint_every=40",
         "--set", "generator_training.iterations=20", "--set", "generator_training.checkpoint_every=20",
         "--set", "generator.num_primitives=32", "--set", "ray.local_dashboard=false"]
PAST_LVIS = ["--set", "vocabulary.extra_unseen=imagenet21k", "--set", "generator_training.iterations=4",
             "--set", "generator_training.unseen_classes_per_step=64", "--set", "generator_training.log_every=1"]

pytestmark = pytest.mark.slow


def _run(args: list[str], tmp: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:])
    return proc


@pytest.fixture(scope="module")
def lvis_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lvis")
    output = tmp / "out"
    proc = _run(["pipelines/full.py", "--config", str(CONFIG), "--output", str(output), *SHORT], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "output": output, "stdout": proc.stdout}


def test_every_stage_runs_over_the_1203_lvis_classes(lvis_run):
    results = json.loads((lvis_run["output"] / "results.json").read_text())
    lvis = results["lvis"]
    for group in ("seen", "unseen", "hm"):
        assert math.isfinite(lvis[group]["ap"]) and 0.0 <= lvis[group]["ap"] <= 100.0
    assert {"ap", "ap_r", "ap_c", "ap_f"} <= set(lvis["all"])
    assert set(results["wall_seconds"]) == {"prepare", "pretrain", "extract", "generator", "evaluate"}
    table = json.loads((lvis_run["output"] / "manifest" / "classes.json").read_text())
    assert len(table) == 1203 and sum(c["unseen"] for c in table) == 337
    assert "OVIS (LVIS)" in lvis_run["stdout"]


def _vector_file(tmp: Path, texts: list[str]) -> Path:
    """Random 64-d vectors for ``texts`` (encoder ``file``): CI skips encoding 22,000 names with
    MiniLM (about a minute on 2 cores); the README's run uses the real encoder."""
    path = tmp / "vectors.npy"
    np.save(path, np.random.default_rng(0).standard_normal((len(texts), 64)).astype(np.float32))
    path.with_suffix(".names.txt").write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def past_lvis(lvis_run) -> dict:
    """The generator stage over > 20,000 classes on 2 Ray Train workers."""
    from pading.classes import ClassTable
    from pading.vocabulary import extend_with_unseen

    base = ClassTable.from_records(json.loads((lvis_run["output"] / "manifest" / "classes.json").read_text()))
    vectors = _vector_file(lvis_run["tmp"], extend_with_unseen(base, "imagenet21k").texts + ["lunar rover"])
    proc = _run(["pipelines/train_generator.py", "--config", str(CONFIG), "--output", str(lvis_run["output"]),
                 "--force", *SHORT, *PAST_LVIS, "--set", "ray.generator_workers=2", "--set", "semantics.encoder=file",
                 "--set", f"semantics.file={vectors}"], lvis_run["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": json.loads(proc.stdout[proc.stdout.index("{"):]),
            "bundle": lvis_run["output"] / "generator" / "bundle"}


def test_the_generator_stage_trains_over_20000_classes_on_two_workers(past_lvis):
    from pading.run import read_history

    assert len(past_lvis["run"]["workers"]) == 2
    classes = json.loads((past_lvis["bundle"] / CLASSES_FILE).read_text())
    assert len(classes) > 20000 and sum(c["added"] for c in classes) > 19000
    history = read_history(past_lvis["bundle"].parent / "history.jsonl")
    assert history and all(math.isfinite(row["generator/total"]) for row in history)
    assert all(row["generator/num_unseen_in_step"] == 512 for row in history)  # the default unseen sample


def test_the_endpoint_service_answers_at_that_vocabulary(past_lvis, lvis_run):
    from PIL import Image

    from pading.bundle import Bundle
    from pading.serving.service import SegmentationService

    bundle = Bundle.load(past_lvis["bundle"])
    # 10 re-fit steps instead of serve.fit_steps' 100: the same path (a step scores the step's
    # synthetic rows against all 22,000 classes), a tenth of the time; benchmarks/vocab_scaling.py
    # times the default at 20,000 classes
    service = SegmentationService(bundle, dataclasses.replace(bundle.config.serve, fit_steps=10))
    size = service.classes()["num_classes"]
    assert size > 20000
    image = np.asarray(Image.open(next((lvis_run["output"] / "datasets").rglob("val2017/*.jpg"))).convert("RGB"))
    answer = service.segment([image], task="instance")[0]
    assert answer["vocabulary_version"] == 0 and "instance" in answer
    added = service.add_classes(["lunar rover"])
    assert added["num_classes"] == size + 1


def test_segment_py_segments_with_that_bundle(past_lvis, lvis_run, tmp_path):
    images = sorted((lvis_run["output"] / "datasets").rglob("val2017/*.jpg"))[:3]
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    output = tmp_path / "segmented"
    proc = _run(["pipelines/segment.py", "--bundle", str(past_lvis["bundle"]), "--input", str(listing),
                 "--output", str(output), "--task", "instance"], lvis_run["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["images"] == 3 and summary["rejected"] == 0


def test_a_chunk_size_that_cannot_fit_is_refused_before_any_work(lvis_run):
    stage = lvis_run["output"] / "generator"
    before = sorted(p.name for p in stage.iterdir())
    proc = _run(["pipelines/train_generator.py", "--config", str(CONFIG), "--output", str(lvis_run["output"]),
                 "--force", *SHORT, "--set", "losses.chunk_size=1000000000000"], lvis_run["tmp"], timeout=300)
    assert proc.returncode != 0
    assert "losses.chunk_size=1000000000000 does not fit" in proc.stderr
    assert sorted(p.name for p in stage.iterdir()) == before  # nothing written
