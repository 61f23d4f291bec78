"""Atomic, checksummed checkpoints in .npz (no pickle): rank 0 writes, every rank learns the outcome, resume picks the newest.

A checkpoint is one ``ckpt-SSSSSSSS.npz`` file (SSSSSSSS = the number of
steps done): a plain zip of ``.npy`` arrays plus ``__meta__`` (JSON as
uint8), readable with ``np.load``. Its zip comment holds
``collective-sha256:<hex>``, the SHA-256 of every byte before the digest, so
one flipped byte anywhere is detected and reported with the file's path.

Atomic: the file is written to a temporary name in the same directory,
fsynced, renamed over its final name (an atomic step on POSIX) and the
directory fsynced; only then are checkpoints older than the newest ``keep``
deleted. A kill at any moment leaves the previous checkpoint intact, and at
worst a temporary file, which is ignored (and removed by the next writer).

Collective: ``save`` and ``load_latest`` are called on every rank. Rank 0
does the file work; any rank's error reaches every rank as CheckpointError,
so no rank trains on (or waits forever) while another has failed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CheckpointCorruptError", "CheckpointError", "Checkpointer", "read_checkpoint", "write_checkpoint",
           "DEFAULT_MODE"]

#: Permission bits of a checkpoint file unless asked otherwise: readable and writable by its owner only.
DEFAULT_MODE = 0o600

FORMAT = 1
_PREFIX = b"collective-sha256:"
_HEX = 64
_NAME = re.compile(r"^ckpt-(\d{8,})\.npz$")
_META = "__meta__"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message names the file and the rank)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file fails its checksum or cannot be parsed."""


def _host(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any],
                     mode: int = DEFAULT_MODE) -> None:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temp file, fsync, rename, fsync directory).

    Args:
        path: the final file name (its directory must exist).
        arrays: name -> array (NumPy or CuPy; names may contain "/").
        meta: JSON-serialisable metadata.
        mode: the file's permission bits, set exactly (the umask does not apply): owner-only by default,
            since a model is often private; e.g. ``0o640`` lets the file's group read it.

    Example::

        write_checkpoint("run/ckpt-00000100.npz", {"w": w}, {"step": 100})
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Created with its final permissions, so the data is never readable by others, not even briefly.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with open(fd, "w+b") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, a in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as g:
                        np.lib.format.write_array(g, _host(a), allow_pickle=False)
                m = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
                with zf.open(f"{_META}.npy", "w") as g:
                    np.lib.format.write_array(g, m, allow_pickle=False)
                zf.comment = _PREFIX + b"0" * _HEX  # the digest's placeholder: the comment ends the file
            f.flush()
            size = f.tell()
            f.seek(0)
            h = hashlib.sha256()
            left = size - _HEX
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    raise CheckpointError(f"{tmp}: the file shrank while being checksummed")
                h.update(chunk)
                left -= len(chunk)
            f.seek(size - _HEX)
            f.write(h.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a checkpoint; return (arrays, meta).

    Raises:
        CheckpointCorruptError: the checksum does not match or the file cannot be parsed (names the path).

    Example::

        arrays, meta = read_checkpoint("run/ckpt-00000100.npz")
    """
    path = Path(path)
    data = path.read_bytes()
    tail = len(_PREFIX) + _HEX
    if len(data) < tail or data[-tail:-_HEX] != _PREFIX:
        raise CheckpointCorruptError(f"checkpoint {path}: no checksum at the end of the file (truncated, or not "
                                     "written by collective's trainer)")
    stored = data[-_HEX:].decode(errors="replace")
    actual = hashlib.sha256(memoryview(data)[:-_HEX]).hexdigest()
    if stored != actual:
        raise CheckpointCorruptError(f"checkpoint {path}: SHA-256 mismatch (stored {stored[:16]}..., computed "
                                     f"{actual[:16]}...): the file is corrupted")
    try:
        arrays: dict[str, np.ndarray] = {}
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                with zf.open(name) as g:
                    arrays[name.removesuffix(".npy")] = np.lib.format.read_array(
                        g, allow_pickle=False)
        meta = json.loads(arrays.pop(_META).tobytes().decode())
    except Exception as exc:
        raise CheckpointCorruptError(f"checkpoint {path}: cannot be parsed ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointCorruptError(f"checkpoint {path}: format {meta.get('format')!r}, this version reads {FORMAT}")
    return arrays, meta


def _bcast_bytes(comm: Any, data: bytes | None, root: int) -> bytes:
    n = np.array([len(data) if data is not None else 0], np.int64)
    comm.broadcast(n, root=root, out=n)
    buf = np.frombuffer(data, np.uint8).copy() if comm.rank == root and data else np.zeros(int(n[0]), np.uint8)
    if n[0]:
        comm.broadcast(buf, root=root, out=buf)
    return buf.tobytes()


def agree(comm: Any, error: str | None) -> None:
    """Collective: raise CheckpointError on every rank if any rank passes an error (the first failing rank's message)."""
    if comm is None or comm.size == 1:
        if error is not None:
            raise CheckpointError(error)
        return
    flags = comm.allgather(np.array([1 if error is not None else 0], np.int8))
    bad = [r for r in range(comm.size) if flags[r]]
    if not bad:
        return
    msg = _bcast_bytes(comm, error.encode() if error is not None else None, bad[0]).decode(errors="replace")
    where = "this rank" if comm.rank == bad[0] else f"rank {bad[0]}"
    raise CheckpointError(f"{msg} (reported by {where}; rank(s) {bad} failed; seen on rank {comm.rank} of "
                          f"{comm.size})")


class Checkpointer:
    """Every ``every`` steps, rank 0 writes a checkpoint into ``directory``; the newest ``keep`` are kept.

    Args:
        directory: where checkpoints live (created by rank 0).
        comm: the communicator (None: a single process).
        every: write every this many steps (0: only when ``save`` is called).
        keep: how many of the newest checkpoints to keep (>= 1).
        mode: permission bits of each checkpoint file (default :data:`DEFAULT_MODE`, owner only; e.g.
            ``0o640`` to share with the group).

    Example::

        ck = Checkpointer("run/ckpt", comm, every=100)
        found = ck.load_latest()       # (arrays on rank 0 / None elsewhere, meta) or None
        ...
        if ck.due(step): ck.save(step, lambda: state, meta)
    """

    def __init__(self, directory: str | os.PathLike, comm: Any = None, every: int = 0, keep: int = 2,
                 mode: int = DEFAULT_MODE) -> None:
        if every < 0 or keep < 1:
            raise ValueError(f"Checkpointer: every={every} must be >= 0 and keep={keep} >= 1")
        if not 0 <= mode <= 0o777:
            raise ValueError(f"Checkpointer: mode={mode:#o} must be permission bits between 0o000 and 0o777")
        self.mode = int(mode)
        self.directory = Path(directory)
        self.comm = comm
        self.every = int(every)
        self.keep = int(keep)
        self.rank = 0 if comm is None else comm.rank

    def rebind(self, comm: Any) -> None:
        """Use ``comm`` from now on (after an elastic shrink or grow: its rank 0 writes)."""
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank

    def path_for(self, step: int) -> Path:
        """The file name of the checkpoint after ``step`` steps."""
        return self.directory / f"ckpt-{int(step):08d}.npz"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint in the directory, oldest first (this rank's view)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def due(self, step: int) -> bool:
        """True if a checkpoint should be written after ``step`` steps."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, arrays: Callable[[], dict[str, Any]] | dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: rank 0 writes the checkpoint of ``step``; every rank raises CheckpointError if it failed.

        Args:
            step: steps done.
            arrays: the arrays, or a function returning them (called on rank 0 only).
            meta: JSON-serialisable metadata (``step`` and ``format`` are added).
        """
        path = self.path_for(step)
        err = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for p in self.directory.glob(".ckpt-*.npz.tmp-*"):  # left by a writer that was killed
                    p.unlink(missing_ok=True)
                data = arrays() if callable(arrays) else arrays
                write_checkpoint(path, data, {**meta, "format": FORMAT, "step": int(step)}, self.mode)
                for _, old in self.checkpoints()[:-self.keep]:
                    old.unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - any failure here must reach every rank, not only this one
                err = f"checkpoint {path}: writing failed: {type(exc).__name__}: {exc}"
        agree(self.comm, err)
        return path

    def load_latest(self) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]] | None:
        """Collective: rank 0 reads and verifies the newest checkpoint; every rank gets its metadata.

        Returns:
            None if there is no checkpoint; else (arrays on rank 0 and None on
            the others, meta on every rank). The caller broadcasts the state.

        Raises:
            CheckpointError: on every rank (CheckpointCorruptError on rank 0) if
                the newest checkpoint fails its checksum or cannot be read.
        """
        arrays = None
        meta: dict[str, Any] | None = None
        err = None
        if self.rank == 0:
            found = self.checkpoints()
            if found:
                path = found[-1][1]
                try:
                    arrays, meta = read_checkpoint(path)
                except CheckpointCorruptError as exc:
                    prev = f"; delete it to resume from {found[-2][1]}" if len(found) > 1 else ""
                    err = f"{exc}{prev}"
                except OSError as exc:
                    err = f"checkpoint {path}: cannot be read: {exc}"
        if self.comm is None or self.comm.size == 1:
            if err is not None:
                raise CheckpointCorruptError(err)
        else:
            try:
                agree(self.comm, err)
            except CheckpointError as exc:
                raise CheckpointCorruptError(str(exc)) from None
        if self.comm is not None and self.comm.size > 1:
            blob = _bcast_bytes(self.comm, json.dumps(meta).encode() if self.rank == 0 else None, 0)
            meta = json.loads(blob.decode())
        if meta is None:
            return None
        return arrays, meta
