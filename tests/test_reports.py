"""The tables a run prints (pading.run.reports), from hand-written products."""

from __future__ import annotations

from pading.run.reports import format_results_table, format_trials


def _group(**values):
    return values


def test_the_results_table_gives_each_task_its_rows_in_the_papers_order():
    results = {"panoptic": {g: _group(pq=40.04, sq=80.0, rq=50.0) for g in ("seen", "unseen", "hm")},
               "semantic": {"seen": {"miou": 30.0}, "unseen": {"miou": 10.0}, "hm": {"miou": 15.0}},
               "wall_seconds": {"prepare": 1.0}}
    lines = format_results_table(results).splitlines()
    assert lines[0] == "| task | metric | seen | unseen | HM |"
    assert lines[2] == "| ZSP | PQ | 40.0 | 40.0 | 40.0 |"
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["PQ", "SQ", "RQ", "MIOU"]  # no ZSI row: not run
    assert "wall" not in format_results_table(results)


def test_an_lvis_run_adds_its_mask_ap_rows():
    lvis = {"seen": {"ap": 2.5}, "unseen": {"ap": 0.5}, "hm": {"ap": 0.83},
            "all": {"ap": 1.3, "ap_r": 0.5, "ap_c": 0.6, "ap_f": 3.1, "ap50": 2.2}}
    text = format_results_table({"lvis": lvis})
    assert "| OVIS (LVIS) | mask AP | 2.5 | 0.5 | 0.8 |" in text
    assert text.endswith("| 1.3 | 0.5 | 0.6 | 3.1 | 2.2 |")


def test_trials_are_listed_best_first_with_failed_and_stopped_ones_marked():
    trials = [
        {"trial_id": "a", "params": {"lr": 0.0012345}, "step": 10, "completed": False, "score": 20.0,
         "seen_accuracy": 30.0, "unseen_accuracy": 15.0},
        {"trial_id": "b", "params": {"lr": 0.1, "k": 8}, "step": 20, "completed": True, "score": 25.0,
         "seen_accuracy": 31.0, "unseen_accuracy": 21.0},
        {"trial_id": "c", "params": {"k": 16}, "step": None, "completed": False, "score": None,
         "seen_accuracy": None, "unseen_accuracy": None},
    ]
    lines = format_trials(trials).splitlines()
    assert lines[0] == "| trial | k | lr | steps run | score | seen acc | unseen acc |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["b", "a", "c"]
    assert "| a | None | 0.001234 | 10 (stopped) | 20.0 |" in lines[3]
    assert lines[4].endswith("| - | failed | failed | failed |")
