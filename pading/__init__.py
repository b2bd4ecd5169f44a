"""PADing: universal zero-shot segmentation (primitive generator, semantic alignment,
feature disentanglement) as a pure-PyTorch library. Ray lives in ``pipelines/``."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
