"""The run layer: where a run's products live (:class:`RunLayout`) and how a stage reads
what an earlier one wrote. Ray-free; pipelines/ builds on it (docs/architecture.md)."""

from pading.run.layout import RunLayout
from pading.run.readers import load_table, read_history, read_manifest, read_rejects

__all__ = ["RunLayout", "load_table", "read_history", "read_manifest", "read_rejects"]
