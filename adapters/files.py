"""Safe file access: every scan file the agent reads and every result file it writes goes through here.

Threat (issue 15): anyone who can write into the acquisition folder, or send ``scan.saved`` on the
controller feed, or answer as Nanonis, chooses the paths the agent opens. So:

* **reading** (:func:`read_regular`, :func:`hash_regular`): the path is resolved (``realpath``) and
  must lie inside the read :class:`Roots` (symlinks leading out of them are refused); it is opened
  with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot block the open, a symlink swapped in after the
  check is not followed); ``fstat`` on the open descriptor must say *regular file* (not a FIFO,
  device, directory); on Linux the descriptor's real path (``/proc/self/fd``) is checked against
  the roots again, which closes the race between the check and the open; the size is bounded
  before anything is allocated and the read stops at the bound (a file that grows is refused).
* **writing** (:func:`write_new`): the folder must lie inside the write :class:`Roots` (and is
  created only when it does); the bytes go to a fresh temporary name opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to the open folder, then are renamed over the final
  name (a planted symlink at the final name is replaced, never followed). Files are created 0640
  (not world-readable; a stricter umask is kept).

A refusal is a :class:`agent.errors.RefusedPathError` naming the path and the reason; it never
quotes the file's content.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable

from stm_agent.agent.errors import RefusedPathError

__all__ = ["Roots", "read_regular", "hash_regular", "sha256_file", "sha256_bytes", "write_new",
           "check_inside", "open_regular", "FILE_MODE", "MAX_READ_BYTES"]

#: Mode of the files the agent creates (owner rw, group r, others nothing), before the umask.
FILE_MODE = 0o640
#: Default bound of one read, bytes (an .sxm: 2 GiB data + 1 MiB header, adapters/sxm.py).
MAX_READ_BYTES = (2 << 30) + (1 << 20) + 64
_BLOCK = 1 << 20
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _inside(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


class Roots:
    """A set of folders (resolved once with ``realpath``) that paths must lie in.

    Parameters
    ----------
    folders : iterable of str | Path
        The root folders; they need not exist yet.
    what : str
        Their name in messages, e.g. ``"acquisition roots"``.
    """

    def __init__(self, folders: Iterable[str | Path], what: str = "roots"):
        seen: list[str] = []
        for f in folders:
            if f is None:
                continue
            r = os.path.realpath(os.fspath(f))
            if r not in seen:
                seen.append(r)
        self.folders: tuple[str, ...] = tuple(seen)
        self.what = what

    def __repr__(self) -> str:
        return f"Roots({list(self.folders)!r}, what={self.what!r})"

    def contains(self, path: str | Path) -> bool:
        """True when ``realpath(path)`` lies in (or is) one of the folders."""
        real = os.path.realpath(os.fspath(path))
        return any(_inside(real, f) for f in self.folders)

    def resolve(self, path: str | Path) -> str:
        """``realpath(path)`` when it lies inside the roots.

        Raises
        ------
        RefusedPathError
            It does not (a symlink leading out of them, ``..``, an absolute path elsewhere).
        """
        real = os.path.realpath(os.fspath(path))
        if not any(_inside(real, f) for f in self.folders):
            where = ", ".join(self.folders) or "(none configured)"
            how = " (through a symlink)" if os.path.abspath(os.fspath(path)) != real else ""
            raise RefusedPathError(path, f"outside the {self.what}{how}: {where}")
        return real


def check_inside(fd: int, roots: Roots | None, shown: str | Path) -> None:
    """Check where an open descriptor really points (Linux ``/proc/self/fd``) against ``roots``.

    Raises
    ------
    RefusedPathError
        The descriptor's path is outside ``roots`` (the path was swapped after it was checked).
    """
    if roots is None:
        return
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (macOS): the realpath check before the open stands alone
        return
    if not any(_inside(real, f) for f in roots.folders):
        raise RefusedPathError(shown, f"outside the {roots.what} (changed while it was opened)")


def open_regular(path: str | Path, roots: Roots | None, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open a regular file safely for reading; returns ``(fd, fstat)`` (the caller closes ``fd``).

    See the module notes. ``O_NONBLOCK`` stays set: it has no effect on regular files.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    RefusedPathError
        Outside ``roots``, not a regular file, larger than ``max_bytes``, or cannot be opened.
    """
    target = roots.resolve(path) if roots is not None else os.fspath(path)
    try:
        fd = os.open(target, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            if roots is None:  # an explicit path given by the user: follow it once, then check the kind
                try:
                    fd = os.open(os.path.realpath(target), _READ_FLAGS)
                except OSError as exc2:
                    raise RefusedPathError(path, f"cannot open it ({exc2.strerror or exc2})") from exc2
            else:
                raise RefusedPathError(path, "is a symlink that changed while it was opened") from exc
        elif isinstance(exc, FileNotFoundError):
            raise
        else:
            raise RefusedPathError(path, f"cannot open it ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedPathError(path, f"not a regular file: it is {_kind(st.st_mode)}")
        check_inside(fd, roots, path)
        if st.st_size > max_bytes:
            raise RefusedPathError(path, f"file has {st.st_size} bytes, more than the {max_bytes} accepted")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str | Path, roots: Roots | None = None, max_bytes: int = MAX_READ_BYTES,
                 *, prefix: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file (all of them, or the first ``prefix``), read safely and bounded.

    Parameters
    ----------
    path : str | Path
    roots : Roots, optional
        Folders the file must resolve into; None = no containment check (an explicit user path).
    max_bytes : int
        Largest file accepted; checked on the descriptor's size before reading, and the read stops
        at ``max_bytes + 1`` (a file growing past the bound is refused).
    prefix : int, optional
        Read at most this many bytes from the start (e.g. a header).

    Returns
    -------
    (bytes, os.stat_result)
        The content and ``fstat`` of the descriptor (size, mtime).

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    RefusedPathError
        Outside ``roots``, not a regular file, larger than ``max_bytes``, or unreadable.
    """
    fd, st = open_regular(path, roots, max_bytes)
    limit = max_bytes + 1 if prefix is None else min(prefix, max_bytes + 1)
    try:
        chunks, n = [], 0
        while n < limit:
            try:
                block = os.read(fd, min(_BLOCK, limit - n))
            except OSError as exc:
                raise RefusedPathError(path, f"cannot read it ({exc.strerror or exc})") from exc
            if not block:
                break
            chunks.append(block)
            n += len(block)
    finally:
        os.close(fd)
    if prefix is None and n > max_bytes:
        raise RefusedPathError(path, f"file grew past the {max_bytes} bytes accepted while it was read")
    return b"".join(chunks), st


def hash_regular(path: str | Path, roots: Roots | None = None,
                 max_bytes: int = MAX_READ_BYTES) -> tuple[str, int, os.stat_result]:
    """sha256 (hex), byte count and ``fstat`` of a regular file, streamed in 1 MiB blocks (bounded).

    Raises
    ------
    FileNotFoundError, RefusedPathError
        As :func:`read_regular`.
    """
    fd, st = open_regular(path, roots, max_bytes)
    h, n = hashlib.sha256(), 0
    try:
        while True:
            try:
                block = os.read(fd, _BLOCK)
            except OSError as exc:
                raise RefusedPathError(path, f"cannot read it ({exc.strerror or exc})") from exc
            if not block:
                break
            n += len(block)
            if n > max_bytes:
                raise RefusedPathError(path, f"file grew past the {max_bytes} bytes accepted while it was read")
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest(), n, st


def sha256_file(path: str | Path, roots: Roots | None = None) -> tuple[str, int]:
    """sha256 (hex) and byte size of a regular file (:func:`hash_regular` without the stat).

    Raises
    ------
    FileNotFoundError, RefusedPathError
        As :func:`read_regular` (RefusedPathError is not an OSError: catch both).
    """
    digest, n, _ = hash_regular(path, roots)
    return digest, n


def sha256_bytes(data: bytes) -> str:
    """sha256 (hex) of bytes in memory: the frame_id of a scan."""
    return hashlib.sha256(data).hexdigest()


def write_new(folder: str | Path, name: str, data: bytes, *, roots: Roots | None = None,
              mode: int = FILE_MODE, make_dirs: bool = False, fsync: bool = False) -> Path:
    """Write ``data`` to ``folder/name`` atomically, never following a symlink.

    The bytes go to a new hidden temporary file (``O_CREAT|O_EXCL|O_NOFOLLOW``, relative to the
    opened folder) which is then renamed over ``name``: a reader never sees half a file, and a
    symlink planted at the temporary or the final name is never followed (the final one is replaced).

    Parameters
    ----------
    folder : str | Path
        Destination folder; must resolve inside ``roots`` when given.
    name : str
        Plain file name (no path separator).
    data : bytes
    roots : Roots, optional
        Write roots; None = the caller checked (an explicit ``--out``).
    mode : int
        Permission bits at creation (default 0640, reduced by the umask).
    make_dirs : bool
        Create ``folder`` (and parents) when missing; with ``roots``, only inside them.
    fsync : bool
        fsync the file and the folder (durable before return).

    Returns
    -------
    Path
        ``folder/name``.

    Raises
    ------
    RefusedPathError
        ``folder`` outside ``roots``, ``name`` not a plain name, or the folder is missing and may
        not be created.
    OSError
        The folder cannot be created or written (disk full, read-only ...).
    """
    if not name or os.sep in name or name in (".", "..") or (os.altsep and os.altsep in name):
        raise RefusedPathError(name, "not a plain file name")
    folder = Path(folder)
    real = roots.resolve(folder) if roots is not None else os.path.realpath(folder)
    if not os.path.isdir(real):
        if not make_dirs:
            raise RefusedPathError(folder, "the folder does not exist (not created: not a configured output folder)")
        os.makedirs(real, exist_ok=True)
        real = roots.resolve(folder) if roots is not None else os.path.realpath(folder)
    dfd = os.open(real, _DIR_FLAGS)
    try:
        check_inside(dfd, roots, folder)
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_CLOEXEC", 0), mode, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                k = os.write(fd, view)
                view = view[k:]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.close(fd)
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        if fsync:
            os.fsync(dfd)
    finally:
        os.close(dfd)
    return folder / name
