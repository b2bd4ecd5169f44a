"""How far each stage is from the limit: the stage as it runs against the same work as a
bare PyTorch loop in one process (no Ray, no checkpoints, no logging, no MLflow).

Runs ``python pipelines/full.py --config CONFIG --output DIR`` from scratch (or reads a
finished run with ``--reuse``), then repeats each stage's work in this process on the run's
own data and model:

- prepare: index the annotations and decode every image and its targets
  (``pading.data.manifest``), the seen-only filter;
- pretrain: :func:`pading.training.pretrain.fit_segmenter` for ``--pretrain-steps`` steps
  (the run's first steps: same batches, same initial weights), decoding included;
- extract: :class:`pading.run.extraction.FeatureExtractor` over every shard;
- generator: :func:`pading.training.generator.fit_generator` for ``--generator-steps`` steps
  on the run's features;
- evaluate: :class:`pading.evaluation.predict.EvaluationPredictor` over the val manifest and
  the metrics (:func:`pading.evaluation.predict.summarize`);
- the per-image paths (``--serving``): the endpoint's latency (sequential requests to
  ``python pipelines/serve.py``, at the demo's image size and at a COCO-sized 640 px,
  ``--endpoint-sizes``, behind each ``serve.proxy`` of ``--proxies``: Serve's Python proxy and,
  where Ray Serve has an HAProxy binary, HAProxy; with each ``serve.ingress`` of ``--ingresses``:
  the HTTP front deployment and the model replicas taking HTTP themselves) against :class:`pading.serving.service.SegmentationService` on the
  same bytes in this process, and Ray Serve's own floor for the same requests
  (``benchmarks/serve_floor.py``: no-op applications of the endpoint's shape, so the table
  also says how much of a request is Serve's and how much is the project's);
  ``pipelines/segment.py``'s images/s once its actor is up
  (``--segment-images``, 16 shards by default) against the library's shard segmenter called
  in this process on the same images and shards. Both bare loops run with as many torch
  threads as the replica or actor they stand for (``serve.num_cpus``, ``segment.num_cpus``:
  one by default).

For the two training stages the stage's own time splits in two: the loop (from the stage's
loss history, ``elapsed_s``) and everything outside it (Ray Train's controller and worker
start, model loading, the last checkpoint). The ratio that matters is the loop's per-step
time over the bare loop's; the start-up is reported apart. The training loops and extraction
run twice bare, with torch's own thread count (every core) and with one torch thread (the
other cores left to the library's helper thread, which draws the generator's dropout ahead),
and the faster of the two is the limit, so a stage that leaves cores idle shows it; the
per-image paths are the exception above.

    python benchmarks/stage_overhead.py                         # configs/demo.yaml, ~10 min
    python benchmarks/stage_overhead.py --reuse --output outputs/demo
    python benchmarks/stage_overhead.py --config configs/smoke.yaml --output /tmp/smoke-overhead

Prints a Markdown table and writes ``<output>/stage_overhead.json``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from pading.serving.launch import haproxy_binary

REPO = Path(__file__).resolve().parents[1]
#: How the table names the endpoint's proxies (serve.proxy).
PROXY_NAMES = {"ray": "Ray Serve's proxy", "haproxy": "HAProxy"}
INGRESS_NAMES = {"front": "", "replica": ", serve.ingress=replica"}


def run_pipeline(config: Path, output: Path, overrides: list[str]) -> None:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, str(REPO / "pipelines" / "full.py"), "--config", str(config), "--output", str(output)]
    for override in overrides:
        command += ["--set", override]
    log = output.with_suffix(".log")
    print(f"running {' '.join(command)} (log: {log})", flush=True)
    with open(log, "w") as sink:
        subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, check=True)


def loop_split(history: list[dict]) -> tuple[float, float, int]:
    """(seconds in the loop, seconds per step after the first logged step, steps) of a
    stage's loss history (rows with ``step`` and the loop's cumulative ``elapsed_s``)."""
    rows = [r for r in history if "elapsed_s" in r and "step" in r]
    first, last = rows[0], rows[-1]
    per_step = (last["elapsed_s"] - first["elapsed_s"]) / max(1, last["step"] - first["step"])
    return float(last["elapsed_s"]), per_step, int(last["step"])


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def bare_prepare(config) -> float:
    from pading.data.manifest import apply_seen_only_filter, class_table_for, read_split_index, to_rows, validate_rows

    def work():
        table, rows = None, {}
        for split in ("train", "val"):
            records, categories, _ = read_split_index(config.data, split)
            table = table or class_table_for(config.data, categories)
            rows[split] = to_rows(records, table)
        good_train, _ = validate_rows(rows["train"], table, config.data.format)
        validate_rows(rows["val"], table, config.data.format)
        apply_seen_only_filter(good_train, table, config.data.unseen_in_train)

    return timed(work)


def bare_pretrain(config, output: Path, steps: int) -> float:
    """Seconds per step of the library loop over the run's first ``steps`` steps."""
    from pading.model.segmenter import Segmenter
    from pading.run import load_table, read_manifest
    from pading.training.pretrain import SegmenterTrainer, fit_segmenter

    table, rows = load_table(output), read_manifest(output, "train")
    config.pretrain.iterations = steps + 1
    torch.manual_seed(config.seed)
    trainer = SegmenterTrainer(Segmenter(config.segmenter, table.num_classes), config)
    marks = []
    fit_segmenter(trainer, rows, table, on_step=lambda trainer, row: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def bare_extract(config, output: Path) -> tuple[float, float, int]:
    """Seconds in all (the model loading included), seconds of the per-shard loop alone, images."""
    from pading.data.manifest import shard_rows
    from pading.run import RunLayout, load_table, read_manifest
    from pading.run.extraction import FeatureExtractor

    rows, table = read_manifest(output, "train"), load_table(output)
    shards = shard_rows(rows, config.ray.extract_shard_size)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        # told its workload as the stage's one actor is, so both pick the same runtime
        extractor = FeatureExtractor(config, str(RunLayout(output).segmenter), table.to_records(), rows, scratch,
                                     "benchmark", images=sum(len(ids) for ids in shards))
        loop_started = time.perf_counter()
        for index, ids in enumerate(shards):
            extractor({"shard": [index], "image_ids": [ids]})
        finished = time.perf_counter()
        return finished - started, finished - loop_started, sum(len(ids) for ids in shards)


def generator_setup(config, output: Path):
    """The generator stage's trainer as the run's worker builds it, and its batches (an iterator)."""
    from pading.data.features import feature_batches, feature_files, read_features, with_no_object_index
    from pading.model.segmenter import Segmenter
    from pading.run.inputs import load_generator_inputs
    from pading.training.generator import GeneratorTrainer

    inputs = load_generator_inputs(config, output, extend_vocabulary=True)
    table = inputs.table
    segmenter = Segmenter.load(inputs.segmenter_dir, map_location="cpu")
    semantics = torch.tensor(np.asarray(inputs.semantics(), dtype=np.float32))
    trainer = GeneratorTrainer(table, semantics, config.segmenter.hidden_dim, config, class_head=segmenter.class_head)
    features = with_no_object_index(read_features(feature_files(inputs.features_dir)), inputs.base_classes,
                                    table.no_object_index)
    rows = config.generator_training.batch_images * config.segmenter.num_queries
    return trainer, feature_batches(features, rows, seed=config.seed)


def bare_generator(config, output: Path, steps: int) -> float:
    """Seconds per step of the library loop on the run's features."""
    from pading.training.generator import fit_generator

    trainer, batches = generator_setup(config, output)
    marks = []
    fit_generator(trainer, batches, steps + 1, on_step=lambda trainer, metrics: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def bare_evaluate(config, output: Path) -> float:
    from pading.data.manifest import resolve
    from pading.evaluation.predict import EvaluationPredictor, summarize
    from pading.run import RunLayout, load_table, read_manifest

    rows, table, data = read_manifest(output, "val"), load_table(output), config.data
    root = Path(data.root)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        predictor = EvaluationPredictor(str(RunLayout(output).bundle), scratch, data.format,
                                        batch_size=config.ray.extract_batch_size, inference=config.inference,
                                        images=len(rows))  # as the stage's one actor is told
        result = []
        for start in range(0, len(rows), 16):
            batch = predictor(rows[start:start + 16])
            result.extend(dict(zip(batch, values)) for values in zip(*batch.values()))
        summarize(result, table, data.format, scratch,
                  gt_panoptic_json=resolve(root, data.val_panoptic_json), gt_panoptic_dir=resolve(root, data.val_panoptic_dir),
                  gt_instances_json=resolve(root, data.instances_json("val")),
                  gt_semantic_dir=resolve(root, data.val_semantic_dir), images=rows)
        return time.perf_counter() - started


def val_image_bytes(output: Path, count: int) -> list[bytes]:
    from pading.run import read_manifest

    rows = read_manifest(output, "val")
    return [Path(rows[k % len(rows)]["image_path"]).read_bytes() for k in range(count)]


def resized_bytes(images: list[bytes], size: int | None) -> list[bytes]:
    """The images as they are (``size`` None), or resized to ``size`` px on the long side and
    re-encoded as JPEG: a COCO-sized request (640 px) to a model that runs at the demo's 64 px."""
    if size is None:
        return images
    from PIL import Image

    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            scale = size / max(image.size)
            image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


def median_call_ms(call, images: list[bytes], warm_up: int = 3) -> float:
    """Median ms of ``call(image)`` over ``images``, one at a time, after ``warm_up`` calls on
    the first image (the bare and served per-image paths, and benchmarks/serve_floor.py)."""
    times = []
    for data in [images[0]] * warm_up + images:
        started = time.perf_counter()
        call(data)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times[warm_up:]))


def alternating_median_ms(calls: list, images: list[bytes], block: int = 10, warm_up: int = 3) -> list[float]:
    """Median ms of each of ``calls`` over ``images``, the calls taking turns in blocks of
    ``block`` images (each call runs a block back to back, then the next call the same block),
    after ``warm_up`` calls of each on the first image. Within a block each call runs as a
    loop does; taking turns, a drift of the machine's speed over the minutes of a run moves
    every call's times alike, which one call's images and then the other's did not
    (docs/performance.md, "Bare and served in turn")."""
    times: list[list[float]] = [[] for _ in calls]
    for call in calls:
        for _ in range(warm_up):
            call(images[0])
    for first in range(0, len(images), block):
        for measured, call in zip(times, calls):
            for data in images[first:first + block]:
                started = time.perf_counter()
                call(data)
                measured.append(time.perf_counter() - started)
    return [1000 * float(np.median(measured)) for measured in times]


class PlainClient:
    """Sequential POSTs over one keep-alive connection with the standard library's
    ``http.client``: the endpoint's latency with as little of a client's own time in it as
    Python allows. httpx (which the benchmarks used before) took 0.7-0.9 ms more a request on
    this machine, the same requests alternating on one server (docs/performance.md, "The
    client's share")."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        parts = urllib.parse.urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def post(self, path: str, data: bytes, params: dict | None = None) -> http.client.HTTPResponse:
        """The answer (read whole) of POST ``path``; raises for a status other than 2xx."""
        target = self.prefix + path + ("?" + urllib.parse.urlencode(params) if params else "")
        self.connection.request("POST", target, body=data, headers={"Content-Type": "application/octet-stream"})
        response = self.connection.getresponse()
        response.body = response.read()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"POST {target}: {response.status} {response.body[:500]!r}")
        return response

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "PlainClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def running_endpoint(bundle: Path, port: int, log_path: Path, settings: list[str]):
    """``python pipelines/serve.py --bundle BUNDLE --port PORT --set S ...`` for each of
    ``settings``, its output in ``log_path`` (kept: a slow shutdown is diagnosed from it);
    yields its URL once ``/healthz`` answers, and stops it (with whatever it left in its process
    group) on the way out."""
    import httpx

    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "serve.py"), "--bundle", str(bundle),
                                   "--port", str(port), *[arg for setting in settings for arg in ("--set", setting)]],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield url
    finally:
        # SIGTERM to serve.py, which shuts Serve down on it. (SIGINT did not stop it when this
        # benchmark ran in the background: a background job of a non-interactive shell inherits
        # SIGINT as ignored; serve.py now installs its own SIGINT handler too.)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:  # the numbers are taken; do not lose them to a slow shutdown
            print(f"pipelines/serve.py did not stop within 120 s of SIGTERM; killing it (its log: {log_path})",
                  flush=True)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever it left behind in its group
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=60)


def endpoint_latency(output: Path, requests: int, port: int, sizes: list[int | None], runtime: str = "auto",
                     proxy: str = "ray", ingress: str = "front") -> dict:
    """Median ms per request for each image size in ``sizes`` (None: the val images as they
    are): sequential POSTs to ``pipelines/serve.py`` behind ``proxy`` (``serve.proxy``) with
    ``ingress`` (``serve.ingress``; one server for all sizes), and
    ``SegmentationService.segment`` on the same bytes in this process with the replica's
    torch threads (``serve.num_cpus``), both on the segmenter runtime ``runtime``
    (``serve.runtime``), taking turns in blocks of ten images (:func:`alternating_median_ms`). {size: (served, bare)}"""
    from pading.bundle import Bundle
    from pading.run import RunLayout
    from pading.serving.service import SegmentationService
    from pipelines.common import actor_threads

    bundle = RunLayout(output).bundle
    originals = val_image_bytes(output, requests)
    payloads = {size: resized_bytes(originals, size) for size in sizes}
    trained = Bundle.load(bundle)
    results = {}
    with actor_threads(trained.config.serve.num_cpus):  # as many as a replica runs (ONNX Runtime's too)
        service = SegmentationService(trained, dataclasses.replace(trained.config.serve, runtime=runtime))
        with running_endpoint(bundle, port, output / "stage_overhead_serve.log",
                              [f"serve.runtime={runtime}", f"serve.proxy={proxy}", f"serve.ingress={ingress}"]) as url:
            with PlainClient(url) as client:
                for size, images in payloads.items():
                    # ten images bare, then the same ten as requests, and so on: the machine's
                    # drift over the minutes of a run moves both alike (docs/performance.md,
                    # "Bare and served in turn")
                    bare, served = alternating_median_ms([
                        lambda data: service.segment([service.decode(data)], ["panoptic"], ["json"]),
                        lambda data: client.post("/v1/segment", data, {"task": "panoptic"})], images)
                    results[size] = (served, bare)
    return results


def serve_floor(output: Path, requests: int, port: int, sizes: list[int | None], num_cpus: float,
                proxy: str = "ray") -> dict:
    """``benchmarks/serve_floor.py`` in a child process (its own Ray): {size: {application: ms}}
    for the same requests to no-op applications of the endpoint's shape behind ``proxy``; {}
    when it fails."""
    labels = ",".join("demo" if size is None else str(size) for size in sizes)
    try:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_floor.py"), "--output", str(output),
                               "--sizes", labels, "--requests", str(requests), "--port", str(port),
                               "--num-cpus", str(num_cpus), "--proxy", proxy], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        print("benchmarks/serve_floor.py did not finish within 600 s; no floor measured", flush=True)
        return {}
    if done.returncode != 0:
        print(f"benchmarks/serve_floor.py failed ({done.returncode}); no floor measured:\n{done.stderr[-2000:]}",
              flush=True)
        return {}
    floors = json.loads(done.stdout.strip().splitlines()[-1])
    return {None if label == "demo" else int(label): value for label, value in floors.items()}


def segment_rate(output: Path, count: int, runtime: str = "auto") -> tuple[float, float, float]:
    """(wall s, images/s once the actors are up) of ``pipelines/segment.py`` over ``count``
    val images (one actor, the default shard size), and images/s of the library's shard
    segmenter in this process over the same images in the same shards. The command's rate
    runs from its actor's first shard start to its last shard end, so the first shard's
    warm-up (a fresh process's first forward passes) is in it: ``count`` should be many
    shards. Both run the segmenter on ``runtime`` (``segment.runtime``)."""
    from pading.config import SegmentConfig
    from pading.run import RunLayout
    from pading.serving.batch import SUMMARY_FILE, ShardSegmenter
    from pipelines.common import actor_threads

    bundle = RunLayout(output).bundle
    shard = SegmentConfig().shard_size
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "in"
        inputs.mkdir()
        for k, data in enumerate(val_image_bytes(output, count)):
            (inputs / f"{k:06d}.png").write_bytes(data)
        target = Path(scratch) / "out"
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "pipelines" / "segment.py"), "--bundle", str(bundle), "--input",
                        str(inputs), "--output", str(target), "--concurrency", "1",
                        "--set", f"segment.runtime={runtime}"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((target / SUMMARY_FILE).read_text())
        paths = sorted(str(p) for p in inputs.iterdir())
        with actor_threads(SegmentConfig().num_cpus):  # as many as the command's actor runs
            segmenter = ShardSegmenter(str(bundle), str(Path(scratch) / "bare"), "panoptic", runtime=runtime,
                                       images=len(paths))  # as the command's one actor is told
            started = time.perf_counter()
            for index in range(0, len(paths), shard):
                segmenter({"shard": [index], "paths": [paths[index:index + shard]],
                           "image_ids": [list(range(index, index + len(paths[index:index + shard])))]})
            bare_rate = len(paths) / (time.perf_counter() - started)
    return wall, float(summary.get("steady_images_per_second", 0.0)), bare_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--output", type=Path, default=Path("/tmp/pading-stage-overhead"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reuse", action="store_true", help="read a finished run at --output instead of running one")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--generator-steps", type=int, default=400)
    parser.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True,
                        help="also the endpoint and pipelines/segment.py (starts Serve; ~2 min)")
    parser.add_argument("--requests", type=int, default=100, help="endpoint requests per image size")
    parser.add_argument("--endpoint-sizes", default="demo,640",
                        help="image sizes sent to the endpoint: 'demo' (the val images as they are) or a long side in px")
    parser.add_argument("--segment-images", type=int, default=1024,
                        help="images for pipelines/segment.py and its bare loop (16 shards of 64 by default)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"],
                        help="the segmenter runtime of the per-image paths, served and bare (serve.runtime, segment.runtime)")
    parser.add_argument("--proxies", default=None,
                        help="serve.proxy values the endpoint is measured behind, e.g. 'ray,haproxy' (default: "
                             "ray, and haproxy where Ray Serve has an HAProxy binary)")
    parser.add_argument("--ingresses", default="front,replica",
                        help="serve.ingress values the endpoint is measured with behind each proxy: front (the "
                             "default: an HTTP front deployment calls the model replicas), replica (they take HTTP)")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="the five stages' bare loops (--no-training: the per-image paths only)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pading.config import load_config
    from pading.run.layout import RunLayout

    output = args.output.resolve()
    if not (args.reuse and (output / "results.json").is_file()):
        run_pipeline(args.config, output, args.overrides)
    results = json.loads((output / "results.json").read_text())
    wall = results["wall_seconds"]

    def config():
        return load_config(output / "config.yaml")

    layout = RunLayout(output)
    # The per-image paths first, while this process has run no training loop: the same
    # request took 75 ms instead of 40 once in a process that had just run them.
    serving_rows = []
    if args.serving:
        sizes = [None if size == "demo" else int(size) for size in args.endpoint_sizes.split(",")]
        proxies = args.proxies.split(",") if args.proxies else ["ray"] + (["haproxy"] if haproxy_binary() else [])
        for proxy in proxies:
            latencies = {ingress: endpoint_latency(output, args.requests, args.port, sizes, args.runtime, proxy,
                                                   ingress) for ingress in args.ingresses.split(",")}
            floors = serve_floor(output, args.requests, args.port + 1, sizes, config().serve.num_cpus, proxy)
            for ingress, by_size in latencies.items():
                shape = "one deployment" if ingress == "replica" else "two deployments"
                for size, (served, bare_ms) in by_size.items():
                    label = f"{config().data.image_size} px (demo)" if size is None else f"{size} px"
                    behind = ("" if proxy == "ray" else f", {PROXY_NAMES[proxy]}") + INGRESS_NAMES[ingress]
                    row = {"stage": f"endpoint{behind} (ms per {label} image)", "proxy": proxy, "ingress": ingress,
                           "served_ms": served, "bare_ms": bare_ms, "loop_ratio": served / bare_ms}
                    if size in floors:
                        row.update(floor_shape=shape, floor_ms=floors[size][shape],
                                   over_floor_ratio=(served - floors[size][shape]) / bare_ms)
                    serving_rows.append(row)
        seg_wall, steady, bare_rate = segment_rate(output, args.segment_images, args.runtime)
        serving_rows.append({"stage": "segment.py (images/s)", "wall_s": seg_wall, "steady_rate": steady,
                             "bare_rate": bare_rate, "loop_ratio": bare_rate / steady if steady else float("nan")})
    rows = [] if not args.training else stage_rows(args, output, wall, config, layout)
    rows.extend(serving_rows)
    print_table(rows, wall)
    (output / "stage_overhead.json").write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(),
                                                            "runtime": args.runtime, "wall_seconds": wall}, indent=1))


def stage_rows(args, output: Path, wall: dict, config, layout) -> list[dict]:
    """The five stages against their bare loops."""
    from pading.run import read_history
    from pipelines.common import actor_threads

    rows = []
    print(f"bare loops with {torch.get_num_threads()} torch threads", flush=True)
    bare = bare_prepare(config())
    rows.append({"stage": "prepare", "wall_s": wall["prepare"], "bare_s": bare})
    for stage, steps, bare_loop in (("pretrain", args.pretrain_steps, bare_pretrain),
                                    ("generator", args.generator_steps, bare_generator)):
        loop_s, per_step, total_steps = loop_split(read_history(layout.history(stage)))
        per_threads = {}
        for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
            with actor_threads(threads):
                per_threads[threads] = bare_loop(config(), output, steps)
            print(f"  {stage}: bare {1000 * per_threads[threads]:.1f} ms/step over {steps} steps on {threads} "
                  f"torch thread(s)", flush=True)
        bare_step = min(per_threads.values())  # the limit: the faster thread count
        rows.append({"stage": stage, "wall_s": wall[stage], "outside_loop_s": wall[stage] - loop_s, "loop_s": loop_s,
                     "step_ms": 1000 * per_step, "bare_step_ms": 1000 * bare_step, "bare_s": bare_step * total_steps,
                     "loop_ratio": per_step / bare_step,
                     "bare_step_ms_by_threads": {n: 1000 * t for n, t in per_threads.items()}})
    # extract: the actors' steady rate (first shard start to last shard end, recorded by the
    # stage) against the bare per-shard loop; the actor start and model loading are "outside".
    # both thread counts, the faster the limit, as for the training loops: the stage runs its
    # extractor on ray.cpus_per_worker threads (one in the demo), in the driver as in an actor,
    # so that both give the same features bit for bit; two threads give other float rounding
    by_threads = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        with actor_threads(threads):
            by_threads[threads] = bare_extract(config(), output)
        print(f"  extract: bare {1000 * by_threads[threads][1] / by_threads[threads][2]:.2f} ms/image on {threads} "
              f"torch thread(s)", flush=True)
    bare_all, bare_loop_s, images = min(by_threads.values(), key=lambda measured: measured[1])
    steady = float(json.loads((layout.features / "_SUCCESS.json").read_text()).get("steady_images_per_second") or 0)
    extract = {"stage": "extract", "wall_s": wall["extract"], "bare_s": bare_all,
               "bare_step_ms_by_threads": {n: 1000 * loop / count for n, (_, loop, count) in by_threads.items()}}
    if steady:
        extract.update(outside_loop_s=wall["extract"] - images / steady, step_ms=1000 / steady,
                       bare_step_ms=1000 * bare_loop_s / images, loop_ratio=images / steady / bare_loop_s)
    rows.insert(2, extract)
    rows.append({"stage": "evaluate", "wall_s": wall["evaluate"], "bare_s": bare_evaluate(config(), output)})
    for row in rows:
        row["wall_ratio"] = row["wall_s"] / row["bare_s"]
    return rows


def print_table(rows: list[dict], wall: dict) -> None:
    def cell(row, key, fmt="{:.1f}"):
        return fmt.format(row[key]) if key in row else ""

    print("\n| stage | stage wall s | outside the loop s | stage ms/step | bare ms/step | bare s | "
          "loop / bare | wall / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "served_ms" in row:
            print(f"| {row['stage']} | | | {row['served_ms']:.0f} ms | {row['bare_ms']:.0f} ms | | "
                  f"{row['loop_ratio']:.2f} | |")
        elif "steady_rate" in row:
            print(f"| {row['stage']} | {row['wall_s']:.1f} | | {row['steady_rate']:.2f}/s | {row['bare_rate']:.2f}/s | | "
                  f"{row['loop_ratio']:.2f} | |")
        else:
            others = "; ".join(f"{threads} thread{'s' if threads > 1 else ''}: {ms:.1f}"
                               for threads, ms in row.get("bare_step_ms_by_threads", {}).items()
                               if abs(ms - row.get("bare_step_ms", -1)) > 1e-9)
            bare_ms = cell(row, "bare_step_ms") + (f" ({others})" if others else "")
            print(f"| {row['stage']} | {row['wall_s']:.1f} | {cell(row, 'outside_loop_s')} | {cell(row, 'step_ms')} | "
                  f"{bare_ms} | {row['bare_s']:.1f} | {cell(row, 'loop_ratio', '{:.2f}')} | {row['wall_ratio']:.2f} |")
    total = sum(wall.values())
    print(f"\nstages {total:.0f} s; bare {sum(r.get('bare_s', 0) for r in rows):.0f} s")
    floors = [row for row in rows if "floor_ms" in row]
    if floors:
        print("\nRay Serve's own floor (benchmarks/serve_floor.py: the same requests to no-op applications "
              "behind the same proxy):")
    shapes = {"two deployments": "the endpoint's shape (front + model deployment)",
              "one deployment": "its shape (one FastAPI deployment)"}
    for row in floors:
        print(f"- {row['stage']}: {row['floor_ms']:.1f} ms for {shapes[row['floor_shape']]}; 1.2x of the bare call "
              f"leaves {0.2 * row['bare_ms']:.1f} ms. Served minus the floor: "
              f"{row['served_ms'] - row['floor_ms']:.1f} ms, {row['over_floor_ratio']:.2f}x the bare call.")


if __name__ == "__main__":
    main()
