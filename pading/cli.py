"""The ``pading`` command line.

    pading data synth --out DIR --train N --val M --size S [--seed K]
    pading evaluate {panoptic,instance,semantic,lvis} ...   (one JSON report on stdout)
    pading embeddings --write-packaged [--out DIR]          (the built-in vocabularies' MiniLM embeddings)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pading.classes import cocostuff_categories
from pading.data.synthetic import add_data_cli
from pading.errors import AnnotationError, DataError, UnknownClassError
from pading.evaluation.metrics import (
    _check_keys,
    _load_coco,
    _load_json,
    evaluate_instance,
    evaluate_lvis,
    evaluate_panoptic,
    evaluate_semantic,
    resolve_unseen_ids,
)


def _categories_from_file(path) -> list[dict]:
    try:
        with Path(path).open("r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(str(path), f"cannot read categories JSON ({err})") from None
    categories = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(categories, list):
        raise AnnotationError(str(path), "expected a list of categories or an object with 'categories'")
    for index, category in enumerate(categories):
        _check_keys(category, ("id", "name"), f"{path}: categories[{index}]")
    return categories


def _unseen_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _run_evaluate(args: argparse.Namespace) -> int:
    try:
        names = _unseen_names(args.unseen)
        if args.task == "panoptic":
            categories = _load_json(args.gt_json, ("categories",))["categories"]
            unseen_ids = resolve_unseen_ids(categories, names)
            report = evaluate_panoptic(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, unseen_ids=unseen_ids)
        elif args.task == "instance":
            coco_gt = _load_coco(args.gt_json)
            unseen_ids = resolve_unseen_ids(coco_gt.dataset["categories"], names)
            report = evaluate_instance(coco_gt, args.pred_json, unseen_ids=unseen_ids)
        elif args.task == "lvis":
            gt = _load_json(args.gt_json, ("images", "annotations", "categories"))
            unseen_ids = resolve_unseen_ids(gt["categories"], names) if names else None  # None: the rare classes
            report = evaluate_lvis(gt, args.pred_json, unseen_ids=unseen_ids)
        else:
            categories = _categories_from_file(args.categories) if args.categories else cocostuff_categories()
            unseen_ids = resolve_unseen_ids(categories, names)
            report = evaluate_semantic(args.gt_dir, args.pred_dir, categories=categories, unseen_ids=unseen_ids)
    except UnknownClassError as err:
        sys.stderr.write(f"pading evaluate: error: {err}\n")
        return 2
    except DataError as err:
        sys.stderr.write(f"pading evaluate: error: {err}\n")
        return 1
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


def add_evaluate_cli(subparsers) -> None:
    """Add ``evaluate {panoptic,instance,semantic,lvis}`` to an argparse subparsers object."""
    evaluate = subparsers.add_parser("evaluate", help="GZSL metrics (seen/unseen/HM) of COCO-format predictions")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    unseen_help = "comma-separated unseen class names (cleaned names like 'tree' accepted); default: none"

    panoptic = tasks.add_parser("panoptic", help="PQ/SQ/RQ of COCO panoptic predictions (JSON + PNGs)")
    panoptic.add_argument("--gt-json", required=True)
    panoptic.add_argument("--gt-dir", required=True)
    panoptic.add_argument("--pred-json", required=True)
    panoptic.add_argument("--pred-dir", required=True)

    instance = tasks.add_parser("instance", help="mAP@0.5 and Recall@100 of COCO results (segm)")
    instance.add_argument("--gt-json", required=True)
    instance.add_argument("--pred-json", required=True)

    semantic = tasks.add_parser("semantic", help="mIoU of label PNGs (category_id - 1, 255 = ignore)")
    semantic.add_argument("--gt-dir", required=True)
    semantic.add_argument("--pred-dir", required=True)
    semantic.add_argument("--categories", default=None, help="COCO-format JSON (default: the 171 COCO-Stuff classes)")

    lvis = tasks.add_parser("lvis", help="LVIS mask AP, AP_r/c/f and seen/unseen AP of LVIS results (docs/lvis.md)")
    lvis.add_argument("--gt-json", required=True, help="LVIS v1 JSON (categories with frequency tags)")
    lvis.add_argument("--pred-json", required=True)

    for sub in (panoptic, instance, semantic, lvis):
        sub.add_argument("--unseen", default=None,
                         help=unseen_help.replace("default: none", "default: the rare classes") if sub is lvis else unseen_help)
        sub.add_argument("--output", default=None, help="also write the JSON report here")
        sub.set_defaults(func=_run_evaluate)


def _run_embeddings(args: argparse.Namespace) -> int:
    from pading.model.semantics import PACKAGED_DIR, write_packaged_embeddings

    if not args.write_packaged:
        raise SystemExit("pading embeddings: nothing to do (--write-packaged writes the packaged embeddings)")
    for path in write_packaged_embeddings(args.out or PACKAGED_DIR):
        sys.stdout.write(f"{path}\n")
    return 0


def add_embeddings_cli(subparsers) -> None:
    embeddings = subparsers.add_parser("embeddings", help="the class-name embeddings shipped with the package")
    embeddings.add_argument("--write-packaged", action="store_true",
                            help="encode the built-in vocabularies with the MiniLM model and write them")
    embeddings.add_argument("--out", default=None, help="where to write them (default: the package's resources)")
    embeddings.set_defaults(func=_run_embeddings)


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="pading")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_cli(sub)
    add_evaluate_cli(sub)
    add_embeddings_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
