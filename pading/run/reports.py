"""The tables a run prints: the Seen / Unseen / HM results of the evaluation
(:func:`format_results_table`, printed by ``full.py`` and ``evaluate.py``) and the trials of a
Tune search (:func:`format_trials`, printed by ``tune.py``). Pure functions of the products
the stages write (``results.json``, ``tune/trials.json``)."""

from __future__ import annotations

from typing import Sequence

#: Each task's row label and metrics, in the order the paper's tables give them.
RESULT_ROWS = {"panoptic": ("ZSP", ("pq", "sq", "rq")), "instance": ("ZSI", ("map50", "recall100")),
               "semantic": ("ZSS", ("miou",))}


def format_results_table(results: dict) -> str:
    """``results.json``'s Seen / Unseen / HM table as Markdown, percent with one decimal; an
    LVIS run adds its mask AP row (seen = frequent + common, unseen = rare; docs/lvis.md) and
    the AP_r / AP_c / AP_f breakdown."""
    lines = ["| task | metric | seen | unseen | HM |", "|---|---|---|---|---|"]
    for task, (label, metrics) in RESULT_ROWS.items():
        if task not in results:
            continue
        row = results[task]
        for metric in metrics:
            lines.append(f"| {label} | {metric.upper()} | {row['seen'][metric]:.1f} | {row['unseen'][metric]:.1f} | "
                         f"{row['hm'][metric]:.1f} |")
    if "lvis" in results:
        row = results["lvis"]
        lines.append(f"| OVIS (LVIS) | mask AP | {row['seen']['ap']:.1f} | {row['unseen']['ap']:.1f} | "
                     f"{row['hm']['ap']:.1f} |")
        lines += ["", "| LVIS mask AP | AP_r | AP_c | AP_f | AP50 |", "|---|---|---|---|---|",
                  "| {ap:.1f} | {ap_r:.1f} | {ap_c:.1f} | {ap_f:.1f} | {ap50:.1f} |".format(**row["all"])]
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _percent(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "failed"


def _score(trial: dict) -> float:
    return trial["score"] if isinstance(trial["score"], (int, float)) else -1.0


def format_trials(trials: Sequence[dict]) -> str:
    """A search's trials (``tune/trials.json`` rows) as Markdown, best score first: the sampled
    params, the steps run ("(stopped)" when ASHA ended the trial early), the score and the seen
    and unseen accuracies; a failed trial's numbers read "failed"."""
    keys = sorted({k for t in trials for k in t["params"]})
    lines = ["| trial | " + " | ".join(keys) + " | steps run | score | seen acc | unseen acc |",
             "|---|" + "---|" * (len(keys) + 4)]
    for t in sorted(trials, key=lambda t: -_score(t)):
        params = " | ".join(_short(t["params"].get(k)) for k in keys)
        steps = "-" if t["step"] is None else f"{int(t['step'])}{'' if t['completed'] else ' (stopped)'}"
        lines.append(f"| {t['trial_id']} | {params} | {steps} | {_percent(t['score'])} | "
                     f"{_percent(t['seen_accuracy'])} | {_percent(t['unseen_accuracy'])} |")
    return "\n".join(lines)
