"""Errors for bad input. Each names the file or record and what is wrong, so a job can
report the item in its rejects table and go on with the rest."""

from __future__ import annotations


class PadingError(Exception):
    """Base class of the library's own errors."""


class DataError(PadingError):
    """An input item (file, record, request) that cannot be used.

    Attributes:
        source: the file path or record key that is bad (e.g. ``"val2017/0001.jpg"``,
            ``"panoptic_val2017.json: annotations[3]"``).
        reason: what is wrong, one sentence.
    """

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.source, self.reason))


class CorruptImageError(DataError):
    """An image file that cannot be decoded (truncated, not an image, empty)."""


class AnnotationError(DataError):
    """An annotation file or record that is malformed (missing key, ids not in JSON...)."""


class UnknownClassError(PadingError, KeyError):
    """A class name or category id that is not in the class table."""

    def __init__(self, what: str, known: list | None = None):
        hint = ""
        if known:
            shown = ", ".join(map(str, known[:12]))
            more = f", ... ({len(known)} in all)" if len(known) > 12 else ""
            hint = f"; known: {shown}{more}"
        self.what = what
        super().__init__(f"unknown class {what!r}{hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]

    def __reduce__(self):
        return (_rebuild_unknown_class, (self.args[0], self.what))


def _rebuild_unknown_class(message: str, what: str) -> "UnknownClassError":
    err = UnknownClassError.__new__(UnknownClassError)
    Exception.__init__(err, message)
    err.what = what
    return err


class ConfigError(PadingError, ValueError):
    """A config file or override that is invalid (unknown key, wrong type, bad value)."""


class MissingWeightsError(PadingError, FileNotFoundError):
    """Pretrained weights (CLIP, backbone) were asked for but no local path has them."""
