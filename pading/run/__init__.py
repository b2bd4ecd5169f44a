"""The run layer between the library and Ray: where a run's products live
(:class:`RunLayout`), readers of earlier stages' products, feature extraction, MLflow
tracking, the Tune search's library side and the paper's tables, and what the entry points
do without Ray (``cli``, ``stage``, ``tune_support``, ``batch_job``). Ray-free; pipelines/
builds on it (docs/architecture.md)."""

from pading.run.layout import RunLayout
from pading.run.readers import count_manifest, load_table, read_history, read_manifest, read_rejects

__all__ = ["RunLayout", "count_manifest", "load_table", "read_history", "read_manifest", "read_rejects"]
