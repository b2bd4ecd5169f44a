"""Every config field in pading/config.py carries a note.

The convention: a comment block directly above the field (one or more ``# ...`` lines, the
last on the line just before the field) that says what the setting does. A trailing
comment on the field's own line does not count, so there is one place to look.
"""

import ast
import dataclasses
import textwrap
from pathlib import Path

import pading.config as config_module
from pading.config import _SECTION_NAMES

CONFIG_PATH = Path(config_module.__file__)
CONFIG_DECORATORS = {"config_section", "dataclass"}


def _decorator_name(node: ast.expr) -> str | None:
    """``config_section``, ``dataclass``, ``dataclass(...)`` or ``dataclasses.dataclass`` -> its name."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def config_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """Top-level classes decorated with ``config_section`` or ``dataclass``."""
    return [node for node in tree.body if isinstance(node, ast.ClassDef)
            and any(_decorator_name(d) in CONFIG_DECORATORS for d in node.decorator_list)]


def section_names(tree: ast.Module) -> dict[str, str]:
    """Class name -> section name: ``_SECTION_NAMES``, else the ExperimentConfig field holding it."""
    names = dict(_SECTION_NAMES)
    for cls in config_classes(tree):
        if cls.name != "ExperimentConfig":
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                annotation = ast.unparse(stmt.annotation)
                names.setdefault(annotation, stmt.target.id)
    return names


def has_note(lines: list[str], lineno: int) -> bool:
    """A non-empty ``#`` comment on the line just above line ``lineno`` (1-based)."""
    if lineno < 2:
        return False
    above = lines[lineno - 2].strip()
    return above.startswith("#") and above.lstrip("#").strip() != ""


def fields_without_notes(source: str) -> tuple[list[str], int]:
    """(``section.field`` of every config field with no note above it, number of fields checked)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    names = section_names(tree)
    missing, checked = [], 0
    for cls in config_classes(tree):
        section = names.get(cls.name, cls.name)
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                checked += 1
                if not has_note(lines, stmt.lineno):
                    missing.append(f"{section}.{stmt.target.id}")
    return missing, checked


def test_every_config_field_has_a_note():
    source = CONFIG_PATH.read_text(encoding="utf-8")
    missing, checked = fields_without_notes(source)
    # the parse finds every config dataclass of the module, and every field of each
    found = {cls.name for cls in config_classes(ast.parse(source))}
    defined = {name for name, obj in vars(config_module).items()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__}
    assert found == defined, f"config dataclasses the parse missed or invented: {sorted(found ^ defined)}"
    assert checked == sum(len(dataclasses.fields(getattr(config_module, name))) for name in defined)
    assert not missing, (
        f"{len(missing)} config field(s) without a note (a '# ...' comment on the line(s) directly above "
        f"the field in {CONFIG_PATH.name}): {', '.join(missing)}"
    )


def test_the_check_reports_a_field_without_a_note():
    source = textwrap.dedent('''
        @config_section
        class PretrainConfig:
            """Docstring."""

            # Optimiser steps.
            iterations: int = 10
            batch_size: int = 16
            lr: float = 1e-4  # a trailing comment is not the convention
            # A note cut off from its field by a blank line.

            warmup_steps: int = 10
            #
            grad_clip: float = 0.01
            # Steps between log lines,
            # over two lines.
            log_every: int = 50

        @config_section
        class SegmentConfig:
            shard_size: int = 64

        @config_section
        class ExperimentConfig:
            # The segment section.
            segment: SegmentConfig = field(default_factory=SegmentConfig)
    ''')
    missing, checked = fields_without_notes(source)
    assert checked == 8
    assert missing == ["pretrain.batch_size", "pretrain.lr", "pretrain.warmup_steps", "pretrain.grad_clip",
                       "segment.shard_size"]
