"""Ray Tune search over the generator-side settings (λ, τ, primitive count K, generator lr,
or whatever ``tune.search_space`` lists), on the cached features and segmenter.

    python pipelines/tune.py --config configs/demo.yaml [--num-samples 16] [--set tune.protocol=paper]

Each trial re-trains only the generator and the classifier (pading.run.search.train_and_score)
and reports a validation score every ``tune.report_every`` iterations; ASHA stops weak
trials early. The default protocol (``tune.protocol=pseudo_unseen``) never reads a real
unseen class: a few seen classes play unseen. ``tune.protocol=paper`` scores on the val
images' real unseen classes, as the paper does; such runs are tagged ``protocol=paper`` in
MLflow with a warning. Every trial is an MLflow run nested under the search's run.

Writes ``<output>/tune/best.yaml`` (a full experiment config with the best values, for
``pipelines/full.py --config``) and ``<output>/tune/trials.json``, and prints the best config.
An interrupted search resumes from ``<output>/tune/ray/<name>`` (Tune's restore); a
finished one is only re-printed unless ``--force``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pading.config import ExperimentConfig
from pading.run import RunLayout, read_manifest, tracking
from pading.run import tune_support as support
from pading.run.checkpoint import read_checkpoint, write_checkpoint
from pading.run.inputs import GeneratorInputs, load_generator_inputs
from pading.run.search import SearchSplit, search_class_head, validate_search_space
from pading.run.tune_support import (  # noqa: F401 - re-exported: these were defined here
    PAPER_WARNING,
    RAY_TUNER_STATE,
    MlflowTrialRuns,
    summarize_trials,
)
from pipelines import common

logger = logging.getLogger("pipelines.tune")

PREREQUISITE_STAGES = ("prepare", "pretrain", "extract")


def ensure_features(config: ExperimentConfig, output: Path) -> None:
    """Run prepare, pretrain and extract unless finished (their run() skips when done)."""
    from pipelines.full import run_stages

    run_stages(config, output, PREREQUISITE_STAGES)


def search_space(space: dict) -> dict:
    """``tune.search_space`` of the config -> Ray Tune domains."""
    from ray import tune

    makers = {"loguniform": lambda a: tune.loguniform(a[0], a[1]), "uniform": lambda a: tune.uniform(a[0], a[1]),
              # [low, high] with both ends, as documented (Tune's randint leaves the upper one out)
              "randint": lambda a: tune.randint(int(a[0]), int(a[1]) + 1), "choice": lambda a: tune.choice(list(a)),
              "grid": lambda a: tune.grid_search(list(a))}
    validate_search_space(space)
    return {key: makers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


def val_features(config: ExperimentConfig, output: Path, inputs: GeneratorInputs):
    """Matched query embeddings of the val images (the paper protocol only), as a Ray task."""
    import ray

    extract = ray.remote(num_cpus=config.tune.cpus_per_trial, num_gpus=config.tune.gpus_per_trial)(
        support.extract_val_features)
    return ray.get(extract.remote(config, read_manifest(output, "val"), inputs))


def trial(params: dict, split: SearchSplit, semantics, base_config: ExperimentConfig, class_head,
          iterations: int) -> None:
    """One Tune trial: a config with ``params`` applied, trained and scored, reporting (with
    a checkpoint, so a restored search continues it) every ``tune.report_every`` steps."""
    from ray import tune

    from pading.run.search import train_and_score

    config, device = support.trial_config(params, base_config)
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state, _ = read_checkpoint(directory, map_location=device)

    def report(metrics: dict, trainer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, trainer.state_dict())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    train_and_score(split, semantics, config, iterations=iterations, report_every=config.tune.report_every,
                    callback=report, class_head=class_head, device=device, resume_state=resume_state)


def make_tune_callback(runs: MlflowTrialRuns):
    from ray import tune

    class _Callback(tune.Callback):
        def __init__(self, runs: MlflowTrialRuns):
            self.runs = runs

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.runs.on_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, "FAILED", str(getattr(trial, "error_file", "") or "trial failed"))

    return _Callback(runs)


def search_algorithm(config: ExperimentConfig):
    """Tune's random search, drawing the trials' settings from the run's seed: a rerun of the
    search (or one on another machine) draws the same trials."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.seed)


def run(config: ExperimentConfig, output: Path, force: bool = False, resume: bool = True) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    settings = config.tune
    stage_dir = RunLayout(output).tune
    stage = common.Stage("tune", stage_dir, force)
    if stage.done:
        return stage.done
    # (--force removes the old search in stage.start below)
    resuming = resume and not force and tune.Tuner.can_restore(str(support.experiment_dir(config, output)))
    if resuming:  # before any work: a search of other settings is not resumed
        support.check_resume(config, output)
    stage.start()
    stage_dir.mkdir(parents=True, exist_ok=True)
    space = search_space(settings.search_space)
    common.init_ray(config)
    ensure_features(config, output)
    inputs = load_generator_inputs(config, output)
    split = support.build_split(config, inputs, lambda: val_features(config, output, inputs))
    iterations = settings.max_iterations or config.generator_training.iterations
    trainable = tune.with_resources(
        tune.with_parameters(trial, split=split, semantics=inputs.semantics(), base_config=config,
                             class_head=search_class_head(inputs.class_head(), split, inputs.table),
                             iterations=iterations),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    common.check_resources("a Tune trial", "tune.cpus_per_trial / tune.gpus_per_trial", 1,
                           settings.cpus_per_trial, settings.gpus_per_trial)
    experiment_dir = support.experiment_dir(config, output)
    with support.search_run(config, output, split, iterations) as parent:
        if resuming:
            logger.info("tune: resuming the search in %s", experiment_dir)
            tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
        else:
            support.record_search_settings(config, output)
            callback = make_tune_callback(MlflowTrialRuns(tracking.tracking_uri(config.tracking), parent.experiment_id,
                                                          parent.run_id, parent.tags))
            scheduler = ASHAScheduler(time_attr="step", max_t=iterations, grace_period=min(settings.grace_period, iterations),
                                      reduction_factor=settings.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, num_samples=settings.num_samples,
                                            search_alg=search_algorithm(config),
                                            max_concurrent_trials=settings.max_concurrent_trials or None),
                run_config=tune.RunConfig(name=experiment_dir.name, storage_path=str(experiment_dir.parent),
                                          callbacks=[callback], failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
            )
        info = support.record_results(config, output, summarize_trials(tuner.fit(), iterations), iterations, parent.run_id)
    return stage.finish(info)


def main() -> None:
    common.setup_logging()
    parser = common.base_parser(__doc__)
    parser.add_argument("--num-samples", type=int, default=None, help="trials to sample (default: tune.num_samples)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (the default when one exists)")
    parser.add_argument("--fresh", action="store_true", help="ignore an interrupted search and start a new one")
    args = parser.parse_args()
    if args.num_samples is not None:
        args.overrides.append(f"tune.num_samples={args.num_samples}")
    config, output = common.load(args)
    support.prepare_restart(config, output, args.fresh, args.resume)
    info = run(config, output, force=args.force, resume=not args.fresh)
    print(support.format_report(info, output))


if __name__ == "__main__":
    main()
