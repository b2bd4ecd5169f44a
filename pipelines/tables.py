"""The paper's tables on the configured data: the ablation (projection baseline, GMMN
generator, primitive generator, + alignment, + alignment and disentanglement) and the
primitive count (K = 100 … 500), each as ZSP Seen/Unseen/HM PQ, SQ, RQ, ZSI mAP@0.5 and
ZSS mIoU, mean ± std over seeds. Plus the t-SNE of synthetic unseen features (the paper's
Fig. 5) and a bar chart of the ablation's HM-PQ.

    python pipelines/tables.py --config configs/demo.yaml [--seeds 0,1,2] [--variants gmmn,full]
                               [--primitive-counts 100,400] [--set tables.iterations=500]

Every row × seed is a Ray task (``tables.cpus_per_task`` CPUs, ``tables.gpus_per_task`` GPUs);
the rows share the segmenter and the features: the val images go through the frozen
segmenter once and each row only swaps the classifier. Writes ``<output>/tables/``:
``ablation.md/.csv``, ``primitives.md/.csv``, ``tsne.png``, ``ablation_hm_pq.png``,
``results.json``; one MLflow run per row nested under a ``tables`` run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pading.config import ExperimentConfig
from pading.run import RunLayout, read_manifest, tracking
from pading.run.tables import (
    ABLATION_LABELS,
    TABLES_RESULTS_FILE,
    TSNE_PANELS,
    RowSpec,
    table_rows,
    write_table_outputs,
)
from pipelines import common

logger = logging.getLogger("pipelines.tables")


def _segmenter_cache(config: ExperimentConfig, segmenter_dir: str, rows: list[dict]):
    import torch

    from pading.model.segmenter import Segmenter
    from pading.run.tables import cache_segmenter_outputs

    device = "cuda" if config.tables.gpus_per_task > 0 and torch.cuda.is_available() else "cpu"
    segmenter = Segmenter.load(segmenter_dir, map_location=device)
    return cache_segmenter_outputs(segmenter, rows, image_size=config.data.image_size,
                                   batch_size=config.ray.extract_batch_size)


def _train_row(features, table, semantics, config: ExperimentConfig, cache, class_head, *, variant: str,
               num_primitives: int, seed: int, iterations: int, tsne_per_class: int) -> dict:
    import torch

    from pading.run.tables import train_row

    torch.set_num_threads(max(1, int(config.tables.cpus_per_task)))
    device = torch.device("cuda" if config.tables.gpus_per_task > 0 and torch.cuda.is_available() else "cpu")
    return train_row(features, table, semantics, config, cache, variant=variant, num_primitives=num_primitives,
                     seed=seed, iterations=iterations, class_head=class_head, tsne_per_class=tsne_per_class,
                     device=device)


def run_rows(config: ExperimentConfig, output: Path, rows: list[RowSpec], seeds: tuple) -> tuple[dict, list[dict]]:
    """Train and evaluate every distinct (variant, K) × seed as a Ray task.

    Returns ``({row key: [per-seed outputs]}, failures)``."""
    import ray

    from pading.run.inputs import load_generator_inputs

    inputs = load_generator_inputs(config, output)
    table, segmenter_dir = inputs.table, str(inputs.segmenter_dir)
    settings = config.tables
    resources = {"num_cpus": settings.cpus_per_task, "num_gpus": settings.gpus_per_task}
    common.check_resources("a table task", "tables.cpus_per_task / tables.gpus_per_task", 1,
                           settings.cpus_per_task, settings.gpus_per_task)
    cache_ref = ray.remote(_segmenter_cache).options(**resources).remote(
        config, segmenter_dir, read_manifest(output, "val"))
    shared = [ray.put(inputs.features()), ray.put(table), ray.put(inputs.semantics()), ray.put(config),
              cache_ref, ray.put(inputs.class_head())]
    iterations = settings.iterations or config.generator_training.iterations
    task = ray.remote(_train_row).options(**resources)
    pending = {}
    for spec in {r.key: r for r in rows}.values():
        for seed in seeds:
            draw = settings.tsne_per_class if (spec.variant in TSNE_PANELS and seed == seeds[0]
                                               and spec.num_primitives == config.generator.num_primitives) else 0
            ref = task.remote(*shared, variant=spec.variant, num_primitives=spec.num_primitives, seed=seed,
                              iterations=iterations, tsne_per_class=draw)
            pending[ref] = (spec.key, seed)
    logger.info("tables: %d tasks (%d models × %d seeds), %d iterations each", len(pending),
                len(pending) // len(seeds), len(seeds), iterations)
    done: dict[str, list[dict]] = {}
    failures = []
    remaining = list(pending)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        key, seed = pending[ready[0]]
        try:
            done.setdefault(key, []).append(ray.get(ready[0]))
            logger.info("tables: %s seed %d done (%d left)", key, seed, len(remaining))
        except ray.exceptions.RayError as err:  # a failed row (task error, dead worker) must not lose the others
            logger.error("tables: %s seed %d failed: %s", key, seed, err)
            failures.append({"row": key, "seed": seed, "error": str(err)[:2000]})
    for outputs in done.values():
        outputs.sort(key=lambda o: o["seed"])
    return {"outputs": done, "table": table}, failures


def log_to_mlflow(config: ExperimentConfig, out_dir: Path, written: dict, failures: list[dict]) -> str:
    import mlflow

    tracking.setup(config.tracking)
    with tracking.run(f"{config.name}-tables", tags={"pipeline": "tables"}) as parent:
        tracking.log_params({**config.flat(), "tables.failures": len(failures)})
        for row in written["results"]["rows"]:
            with tracking.run(f"{row['table']}: {row['label']}", nested=True,
                              tags={"pipeline": "tables", "table": row["table"]}):
                tracking.log_params({"variant": row["variant"], "num_primitives": row["num_primitives"],
                                     "seeds": row["seeds_done"]})
                tracking.log_metrics({f"{k}.{stat}": v for k, stats in row["metrics"].items() for stat, v in stats.items()})
                for step, seed_metrics in zip(row["seeds_done"], row["per_seed"]):
                    tracking.log_metrics({f"seed.{k}": v for k, v in seed_metrics.items()}, step=step)
        for path in sorted(out_dir.glob("*.md")) + sorted(out_dir.glob("*.csv")) + sorted(out_dir.glob("*.png")):
            mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(out_dir / TABLES_RESULTS_FILE))
        return parent.info.run_id


def run(config: ExperimentConfig, output: Path, force: bool = False, seeds=None, variants=None,
        primitive_counts=None) -> dict:
    stage_dir = RunLayout(output).tables
    stage = common.Stage("tables", stage_dir, force)
    if stage.done:
        return stage.done
    stage.start()
    seeds = tuple(int(s) for s in (seeds if seeds is not None else config.tables.seeds))
    rows = table_rows(config, variants, primitive_counts)
    common.init_ray(config)
    from pipelines.full import run_stages

    run_stages(config, output, ("prepare", "pretrain", "extract"))
    stage_dir.mkdir(parents=True, exist_ok=True)
    trained, failures = run_rows(config, output, rows, seeds)
    if not trained["outputs"]:
        raise RuntimeError(f"tables: every task failed: {failures[:3]}")
    written = write_table_outputs(config, stage_dir, rows, trained, seeds)
    run_id = log_to_mlflow(config, stage_dir, written, failures)
    info = {"markdown": written["markdown"], "csv": written["csv"], "figures": written["figures"],
            "failures": failures, "seeds": list(seeds), "mlflow_run_id": run_id}
    return stage.finish(info)


def main() -> None:
    common.setup_logging()
    parser = common.base_parser(__doc__)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: tables.seeds)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated ablation variants (default: tables.variants; {', '.join(ABLATION_LABELS)})")
    parser.add_argument("--primitive-counts", default=None, help="comma-separated K values (default: tables.primitive_counts)")
    args = parser.parse_args()
    for flag, key in ((args.seeds, "seeds"), (args.variants, "variants"), (args.primitive_counts, "primitive_counts")):
        if flag is not None:
            values = [v.strip() for v in flag.split(",") if v.strip()]
            args.overrides.append(f"tables.{key}=[{', '.join(values)}]")
    config, output = common.load(args)
    info = run(config, output, force=args.force)
    for name, title in (("ablation", "Ablation"), ("primitives", "Primitive count (full PADing)")):
        if name in info["markdown"]:
            print(f"\n{title} on {config.data.root}\n")
            print(info["markdown"][name])
    print(f"\nwritten to {output / 'tables'}: " + ", ".join(Path(p).name for p in [*info["csv"].values(), *info["figures"]]))
    if info["failures"]:
        print(f"WARNING: {len(info['failures'])} task(s) failed: " + "; ".join(f"{f['row']} seed {f['seed']}"
                                                                           for f in info["failures"]))


if __name__ == "__main__":
    main()
