"""Moved to :mod:`pading.bundle` (the bundle is a format of the library); kept so old imports work."""
from pading.bundle import Bundle, load_classifier, save_classifier

__all__ = ["Bundle", "load_classifier", "save_classifier"]
