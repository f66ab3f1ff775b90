"""Errors that reach the user: each names the slide (or config key), the file and the cause."""

from __future__ import annotations

from pathlib import Path


class WsiscanError(Exception):
    """Base class: an error whose message is shown to the user as it is, without a traceback."""


class SlideError(WsiscanError):
    """A slide (or its annotation or intermediate file) cannot be used."""

    def __init__(self, slide_id: str | None, path: str | Path | None, cause: str) -> None:
        self.slide_id = slide_id
        self.path = str(path) if path is not None else None
        self.cause = cause
        where = f"slide {slide_id!r}" if slide_id else "slide"
        if self.path:
            where += f" ({self.path})"
        super().__init__(f"{where}: {cause}")


class ConfigError(WsiscanError):
    """The config or the sample sheet is invalid; the message names the key or the row."""


class SlideIdError(ConfigError, ValueError):
    """A slide ID outside ``[A-Za-z0-9._-]+`` (or ``.``/``..``): it would escape ``results/``."""


class CheckpointError(WsiscanError):
    """A model checkpoint (or an ImageNet weight file) cannot be used; names the file and cause."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"model file {self.path}: {cause}")
