"""The paper's ablation and primitive-count tables (library side of pipelines/tables.py).

Every row (ablation variant × primitive count K × seed) re-trains only the generator and
the classifier on the cached features (:func:`pading.run.search.train_generator`) and is
evaluated on the val images with one shared pass of the frozen segmenter: the val images'
mask logits and query embeddings are computed once (:func:`cache_segmenter_outputs`), and a
row only swaps the classifier and re-runs the post-processing (pading.evaluation.inference) and the
evaluators (pading.evaluation.predict.summarize). Rows are aggregated over seeds as mean ± std
(:func:`aggregate`) and written as Markdown and CSV; pading.run.table_figures draws the figures.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from pading.classes import ClassTable, clean_name
from pading.config import ExperimentConfig, apply_overrides
from pading.data import (
    load_image,
)
from pading.data.features import FeatureArrays
from pading.data.manifest import resolve
from pading.errors import DataError
from pading.evaluation.predict import error_row, postprocess, summarize, tasks_for, write_prediction
from pading.io import write_json_atomic
from pading.model.segmenter import OriginalSizeMaskLogits, Segmenter, prepare_batch
from pading.run.search import train_generator

logger = logging.getLogger(__name__)

#: Row labels of the ablation table, in the paper's order.
ABLATION_LABELS = {
    "projection": "projection baseline",
    "gmmn": "GMMN generator",
    "primitive": "primitive generator",
    "alignment": "+ alignment",
    "full": "+ alignment and disentanglement",
}
#: (task, metric) columns, each with seen / unseen / HM.
METRIC_COLUMNS = (("panoptic", "pq"), ("panoptic", "sq"), ("panoptic", "rq"), ("instance", "map50"),
                  ("semantic", "miou"), ("lvis", "ap"))
GROUPS = ("seen", "unseen", "hm")
TASK_LABELS = {"panoptic": "ZSP", "instance": "ZSI", "semantic": "ZSS", "lvis": "OVIS (LVIS)"}
METRIC_LABELS = {"pq": "PQ", "sq": "SQ", "rq": "RQ", "map50": "mAP@0.5", "miou": "mIoU", "ap": "mask AP"}
GROUP_LABELS = {"seen": "Seen", "unseen": "Unseen", "hm": "HM"}


@dataclass(frozen=True)
class RowSpec:
    """One row of a table: ``variant`` (losses.variant) with ``num_primitives`` primitives."""

    table: str  # "ablation" | "primitives"
    variant: str
    num_primitives: int
    label: str

    @property
    def key(self) -> str:
        """The trained model this row needs (rows of both tables may share one)."""
        return f"{self.variant}-K{self.num_primitives}"


def table_rows(config: ExperimentConfig, variants: Optional[Sequence[str]] = None,
               primitive_counts: Optional[Sequence[int]] = None) -> list[RowSpec]:
    """The ablation rows (``variants`` at ``generator.num_primitives``) then the primitive-count
    rows (the full method at each count); defaults from ``config.tables``."""
    variants = config.tables.variants if variants is None else tuple(variants)
    counts = config.tables.primitive_counts if primitive_counts is None else tuple(primitive_counts)
    rows = [RowSpec("ablation", v, config.generator.num_primitives, ABLATION_LABELS[v]) for v in variants]
    rows += [RowSpec("primitives", "full", int(k), f"K = {int(k)}") for k in counts]
    return rows


# ---- the shared segmenter pass --------------------------------------------------------------


@dataclass
class CachedImage:
    """The frozen segmenter's output for one val image.

    Attributes:
        row: the manifest row.
        mask_logits: (Q, S/4, S/4) float16 mask logits at the network's output size.
        query_embeddings: (Q, D) float32.
        meta: ``prepare_batch`` geometry (to restore the original size).
        error: why the image could not be used ("" when it could).
    """

    row: dict
    mask_logits: Optional[np.ndarray]
    query_embeddings: Optional[np.ndarray]
    meta: Optional[dict]
    error: str = ""


@torch.no_grad()
def cache_segmenter_outputs(segmenter: Segmenter, rows: Sequence[dict], *, image_size: int,
                            batch_size: int) -> list[CachedImage]:
    """Run the frozen segmenter once over the val manifest ``rows``."""
    segmenter.eval()
    device = next(segmenter.parameters()).device
    cache: list[CachedImage] = []
    for start in range(0, len(rows), batch_size):
        chunk, images = [], []
        for row in rows[start : start + batch_size]:
            try:
                images.append(load_image(row["image_path"]))
                chunk.append(row)
            except DataError as err:
                cache.append(CachedImage(row, None, None, None, f"{err.source}: {err.reason}"))
        if not chunk:
            continue
        batch = prepare_batch(images, image_size)
        output = segmenter(batch["pixel_values"].to(device))
        for i, row in enumerate(chunk):
            cache.append(CachedImage(row, output.mask_logits[i].half().cpu().numpy(),  # (Q, S/4, S/4)
                                     output.query_embeddings[i].float().cpu().numpy(),  # (Q, D)
                                     batch["meta"][i]))
    return cache


def _write_prediction(image: CachedImage, classifier: nn.Module, table: ClassTable, config: ExperimentConfig,
                      output: Path) -> dict:
    """Post-process one cached image with ``classifier`` (pading.evaluation.predict.postprocess) and write
    the COCO-format files pading.evaluation.predict.summarize reads."""
    if image.error:
        return error_row(image.row, image.error)
    mask_logits = OriginalSizeMaskLogits(torch.tensor(image.mask_logits, dtype=torch.float32), image.meta)  # (Q, H, W)
    class_logits = classifier(torch.tensor(image.query_embeddings))  # (Q, C+1)
    prediction = postprocess(mask_logits, class_logits, table=table, inference=config.inference,
                             tasks=tasks_for(config.data.format))
    return write_prediction(image.row, prediction, table, config.data.format, output)


@torch.no_grad()
def evaluate_classifier(cache: Sequence[CachedImage], classifier: nn.Module, table: ClassTable,
                        config: ExperimentConfig, work_dir: Optional[str | Path] = None) -> dict:
    """ZSP / ZSI / ZSS Seen, Unseen and HM of the segmenter with ``classifier`` as its class
    head, on the cached val images: ``{"panoptic"|"instance"|"semantic": {"seen"|"unseen"|"hm": {...}}}``."""
    classifier = classifier.cpu().eval()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        output = Path(tmp)
        for sub in ("panoptic", "semantic", "gt_semantic"):
            (output / sub).mkdir()
        rows = [_write_prediction(image, classifier, table, config, output) for image in cache]
        for row in rows:
            if row["error"]:
                logger.warning("tables: image %s skipped: %s", row["image_id"], row["error"])
        data, root = config.data, Path(config.data.root)
        results = summarize(
            rows, table, data.format, output,
            gt_panoptic_json=resolve(root, data.val_panoptic_json), gt_panoptic_dir=resolve(root, data.val_panoptic_dir),
            gt_instances_json=resolve(root, data.instances_json("val")), gt_semantic_dir=resolve(root, data.val_semantic_dir),
            images=[image.row for image in cache if not image.error],
        )
    results.pop("reports", None)
    return results


# ---- one row ------------------------------------------------------------------------------


def train_row(features: FeatureArrays, table: ClassTable, class_semantics: np.ndarray, config: ExperimentConfig,
              cache: Sequence[CachedImage], *, variant: str, num_primitives: int, seed: int, iterations: int,
              class_head: Optional[nn.Linear] = None, tsne_per_class: int = 0,
              device: Optional[torch.device] = None) -> dict:
    """Train ``variant`` with ``num_primitives`` primitives and ``seed`` and evaluate it.

    Returns ``{"variant", "num_primitives", "seed", "results": <evaluate_classifier output>,
    "synthetic_unseen": (U*n, D) float32 or None, "synthetic_labels": (U*n,) or None}``;
    the synthetic unseen embeddings (``tsne_per_class`` = n per unseen class) are drawn when
    ``tsne_per_class`` > 0 and the variant has a generator.
    """
    row_config = apply_overrides(config, {"losses.variant": variant, "generator.num_primitives": num_primitives,
                                          "seed": seed})
    trainer = train_generator(features, table, class_semantics, row_config, iterations=iterations,
                              class_head=class_head, device=device)
    results = evaluate_classifier(cache, trainer.classifier, table, row_config)
    synthetic, synthetic_labels = None, None
    if tsne_per_class > 0 and trainer.generator is not None and table.unseen_indices:
        unseen = torch.tensor(table.unseen_indices, dtype=torch.long)
        noise = torch.Generator(device=trainer.device).manual_seed(seed)
        synthetic = trainer.synthesize(unseen, tsne_per_class, generator=noise).cpu().numpy()  # (U*n, D)
        synthetic_labels = unseen.repeat_interleave(tsne_per_class).numpy()  # (U*n,)
    return {"variant": variant, "num_primitives": int(num_primitives), "seed": int(seed), "results": results,
            "synthetic_unseen": synthetic, "synthetic_labels": synthetic_labels}


# ---- aggregation and output -----------------------------------------------------------------


def flatten_results(results: dict) -> dict[str, float]:
    """``{"panoptic.seen.pq": 12.3, ...}`` for the table's columns present in ``results``."""
    flat = {}
    for task, metric in METRIC_COLUMNS:
        if task in results:
            for group in GROUPS:
                flat[f"{task}.{group}.{metric}"] = float(results[task][group][metric])
    return flat


def aggregate(per_seed: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean and (sample, ddof=1) std over seeds of flattened results:
    ``{"panoptic.hm.pq": {"mean": m, "std": s}, ...}`` (std 0 for one seed)."""
    if not per_seed:
        raise DataError("tables", "no seeds to aggregate")
    keys = sorted(set.intersection(*(set(r) for r in per_seed)))
    out = {}
    for key in keys:
        values = np.asarray([r[key] for r in per_seed], dtype=np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


def metric_keys(aggregated: dict) -> list[str]:
    """The column keys present, in table order."""
    return [f"{task}.{group}.{metric}" for task, metric in METRIC_COLUMNS for group in GROUPS
            if f"{task}.{group}.{metric}" in aggregated]


def column_label(key: str) -> str:
    task, group, metric = key.split(".")
    return f"{TASK_LABELS[task]} {GROUP_LABELS[group]} {METRIC_LABELS[metric]}"


#: Under a table of panoptic data with ZSI or ZSS columns: what they are scored on.
DERIVED_PROTOCOL_NOTE = (
    "ZSI and ZSS here are scored on instance and semantic ground truth derived from the panoptic "
    "annotations, with the panoptic split's unseen classes: not the paper's ZSI (COCO instances, "
    "48/17 or 65/15 split) or ZSS (COCO-Stuff, 156/15) protocols, which configs/zsi_coco_48_17.yaml, "
    "configs/zsi_coco_65_15.yaml and configs/zss_cocostuff.yaml run.")


def format_markdown(rows: Sequence[tuple[RowSpec, dict]], *, seeds: Sequence[int], data_format: str | None = None) -> str:
    """A Markdown table of ``(row, aggregate(...))`` pairs, cells ``mean ± std``; for
    ``data_format`` panoptic, a note on what its ZSI and ZSS columns are scored on."""
    if not rows:
        return ""
    keys = metric_keys(rows[0][1])
    lines = ["| row | " + " | ".join(column_label(k) for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for spec, aggregated in rows:
        cells = [f"{aggregated[k]['mean']:.1f} ± {aggregated[k]['std']:.1f}" for k in keys]
        lines.append(f"| {spec.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± std over seeds {', '.join(str(s) for s in seeds)}; values in percent.")
    if data_format == "panoptic" and any(k.split(".")[0] in ("instance", "semantic") for k in keys):
        lines.append(DERIVED_PROTOCOL_NOTE)
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[tuple[RowSpec, dict]], *, seeds: Sequence[int]) -> Path:
    """One line per row: label, variant, K, seeds, then ``<metric>_mean`` and ``<metric>_std``."""
    path = Path(path)
    keys = metric_keys(rows[0][1]) if rows else []
    header = ["row", "variant", "num_primitives", "seeds"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for spec, aggregated in rows:
            values = [f"{aggregated[k][s]:.4f}" for k in keys for s in ("mean", "std")]
            writer.writerow([spec.label, spec.variant, spec.num_primitives, " ".join(str(s) for s in seeds)] + values)
    return path


def all_finite(aggregated: dict) -> bool:
    return all(math.isfinite(v) for stats in aggregated.values() for v in stats.values())


#: The t-SNE panels: variant -> title (the paper's Fig. 5 compares these generators).
TSNE_PANELS = {"gmmn": "GMMN generator", "primitive": "primitive generator", "full": "PADing (full)"}
#: The metric of the ablation's bar chart.
HM_PQ = "panoptic.hm.pq"
#: The tables' results, in the tables' stage directory (RunLayout.tables_results).
TABLES_RESULTS_FILE = "results.json"


def write_table_outputs(config: ExperimentConfig, out_dir: Path, rows: Sequence[RowSpec], trained: dict,
                        seeds: Sequence[int]) -> dict:
    """What pipelines/tables.py writes into ``out_dir`` from its rows' outputs (``trained``:
    ``{"outputs": {row key: [per-seed outputs]}, "table": ClassTable}``): per table Markdown and
    CSV, the t-SNE of the synthetic unseen features, the ablation's HM-PQ bar chart and
    :data:`TABLES_RESULTS_FILE`. Returns what was written."""
    from pading.run.table_figures import bar_chart, tsne_figure

    outputs, table = trained["outputs"], trained["table"]
    aggregated = {key: aggregate([flatten_results(o["results"]) for o in runs]) for key, runs in outputs.items()}
    written: dict = {"markdown": {}, "csv": {}, "figures": []}
    for name in ("ablation", "primitives"):
        table_rows_ = [(spec, aggregated[spec.key]) for spec in rows if spec.table == name and spec.key in aggregated]
        if not table_rows_:
            continue
        markdown = format_markdown(table_rows_, seeds=seeds, data_format=config.data.format)
        (out_dir / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
        write_csv(out_dir / f"{name}.csv", table_rows_, seeds=seeds)
        written["markdown"][name] = markdown
        written["csv"][name] = str(out_dir / f"{name}.csv")
    panels = {}
    for variant, title in TSNE_PANELS.items():
        key = f"{variant}-K{config.generator.num_primitives}"
        draws = [o for o in outputs.get(key, []) if o.get("synthetic_unseen") is not None]
        if draws:
            panels[title] = (draws[0]["synthetic_unseen"], draws[0]["synthetic_labels"])
    if panels:
        names = {i: clean_name(table[i].name) for i in table.unseen_indices}
        written["figures"].append(str(tsne_figure(panels, names, out_dir / "tsne.png", seed=seeds[0])))
    ablation = [spec for spec in rows if spec.table == "ablation" and HM_PQ in aggregated.get(spec.key, {})]
    if ablation:
        written["figures"].append(str(bar_chart([s.label for s in ablation],
                                                [aggregated[s.key][HM_PQ]["mean"] for s in ablation],
                                                [aggregated[s.key][HM_PQ]["std"] for s in ablation],
                                                out_dir / "ablation_hm_pq.png")))
    results = {"seeds": list(seeds), "rows": [
        {"table": s.table, "label": s.label, "variant": s.variant, "num_primitives": s.num_primitives,
         "seeds_done": [o["seed"] for o in outputs.get(s.key, [])], "metrics": aggregated.get(s.key, {}),
         "per_seed": [flatten_results(o["results"]) for o in outputs.get(s.key, [])]} for s in rows]}
    write_json_atomic(out_dir / TABLES_RESULTS_FILE, results)
    written["results"] = results
    return written
