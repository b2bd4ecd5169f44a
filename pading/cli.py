"""The ``pading`` command line: ``pading evaluate {panoptic,instance,semantic} ...``."""

from __future__ import annotations

import argparse
import sys

from pading.data.synthetic import add_data_cli
from pading.evaluation import add_evaluate_cli


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="pading")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_cli(sub)
    add_evaluate_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
