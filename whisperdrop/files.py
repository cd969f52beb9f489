"""File-system durability shared by the daemon and the runner."""

from __future__ import annotations

import os


def fsync_directory(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut. Raises OSError."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
