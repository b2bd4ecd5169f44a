"""One format for the training checkpoints of every stage and trial: the trainer's state
(``trainer.state_dict()``: tensors and numbers, read back with ``weights_only=True``) in
:data:`STATE_FILE` and the history rows so far in ``history.jsonl``. Pretraining, the
generator stage, Tune trials and the tables' rows all write and read it here; Ray Train and
Ray Tune only carry the directory (pipelines/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from pading.errors import DataError
from pading.run.layout import HISTORY_FILE
from pading.run.readers import read_history

#: The trainer's state in a checkpoint directory.
STATE_FILE = "trainer_state.pt"
#: Names earlier versions wrote (pretraining, the generator stage): still read, so a run
#: checkpointed before the rename resumes.
LEGACY_STATE_FILES = ("train_state.pt", "generator_state.pt")


def write_checkpoint(directory: str | Path, state: dict, history: Optional[Sequence[dict]] = None) -> Path:
    """Writes ``state`` (and ``history`` when given) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    if history is not None:
        (directory / HISTORY_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
    return directory


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, list[dict]]:
    """``(state, history)`` of a checkpoint directory (history empty when it has none).

    Raises:
        DataError: the directory has no state file.
    """
    directory = Path(directory)
    for name in (STATE_FILE, *LEGACY_STATE_FILES):
        if (directory / name).is_file():
            state = torch.load(directory / name, map_location=map_location, weights_only=True)
            history = read_history(directory / HISTORY_FILE) if (directory / HISTORY_FILE).is_file() else []
            return state, history
    raise DataError(str(directory), f"not a checkpoint: no {STATE_FILE}")
