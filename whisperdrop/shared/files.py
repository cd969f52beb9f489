"""File-system helpers shared by the daemon and the runner: atomic durable writes, file hashing.

Imports nothing from whisperdrop, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
import threading

HASH_CHUNK = 1 << 20
CREATE_MODE = 0o666  # the kernel takes the process umask off: UMask=0002 gives 0664, 0027 gives 0640


class Cancelled(Exception):
    """Work stopped because its cancel event was set (shutdown parks the job). Also `engine.Cancelled`."""


def fsync_directory(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut. Raises OSError."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(descriptor: int, data: bytes) -> None:
    """Write all of `data` to the open file `descriptor` (os.write may write less than asked), then
    fsync it. Raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]
    os.fsync(descriptor)


def write_atomic(path: str | os.PathLike, data: bytes, *, tag: str | None = None, durable: bool = True) -> None:
    """Replace `path` with `data`: a hidden temporary beside it, fsync, rename, then fsync the folder.

    The new file's mode is 0o666 less the process umask, like any file the process creates (the
    runner's unit sets UMask=0002 so the SFTP account may rename and remove what it writes). `tag`
    makes the temporary name `.<name>.<tag>.tmp` unique per writer where several share a folder.
    With `durable=False` the folder is not fsynced (the caller does it once for several files, or
    the file is advisory). A crash leaves the old file or the new one, never a mix. Raises OSError;
    the temporary is removed on failure.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{tag}.tmp" if tag else f".{name}.tmp")
    try:
        os.unlink(temporary)  # a crashed writer's leftover: O_EXCL below then creates it afresh, mode and all
    except FileNotFoundError:
        pass
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         CREATE_MODE)
    try:
        try:
            write_all(descriptor, data)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_directory(folder or ".")


def sha256_file(path: str | os.PathLike | int, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    `path` may be an open descriptor: it is read from offset 0 and left open. Raises OSError, or
    Cancelled when `cancel` is set while reading.
    """
    digest = hashlib.sha256()
    if isinstance(path, int):
        os.lseek(path, 0, os.SEEK_SET)
        read = lambda: os.read(path, HASH_CHUNK)  # noqa: E731
        return _digest(digest, read, cancel)
    with open(path, "rb", buffering=0) as stream:
        return _digest(digest, lambda: stream.read(HASH_CHUNK), cancel)


def _digest(digest, read, cancel: threading.Event | None) -> str:
    while chunk := read():
        digest.update(chunk)
        if cancel is not None and cancel.is_set():
            raise Cancelled()
    return digest.hexdigest()
