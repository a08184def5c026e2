"""The one place that decides what pyckpt may open, create, link, list or delete inside a snapshot
directory (the record P, P.pyckpt/ and everything under it).

- No entry is reached through a symlink: files are opened with O_NOFOLLOW, entries are checked with
  lstat, and unlink/rename/link act on the entry itself. The directories above P are the user's
  (they may be links to a mounted share); the ones below are listed with list_dir, which refuses a
  link, before anything inside them is touched.
- Only regular files are opened and only real directories listed: files are opened with O_NONBLOCK
  (a FIFO would block the reader forever, a device feed it endless bytes) and checked with fstat.
- Anything else is refused with IntegrityError naming the entry, which is left alone; a
  PermissionError becomes SnapshotAccessError naming the path and the fix. A missing path stays
  FileNotFoundError: each caller says what a missing file means.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from contextlib import contextmanager, suppress
from typing import Iterator

from .errors import IntegrityError, SnapshotAccessError

_NO_LINK = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_KINDS = ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISREG, "regular file"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def refused(path: str, mode: int, expected: str) -> IntegrityError:
    """The error for an entry of the wrong kind (a symlink, a FIFO, a directory where a file belongs)."""
    return IntegrityError(f"{path}: is a {_kind(mode)}, not a {expected}; pyckpt never follows links or uses "
                          "other kinds of files in a snapshot directory, and left it alone: remove or move it "
                          "(or use another snapshot path)", file=path)


@contextmanager
def _checked(path: str, expected: str) -> Iterator[None]:
    """Turn the OS's refusals for `path` into pyckpt errors (a missing path stays FileNotFoundError)."""
    try:
        yield
    except PermissionError as exc:
        raise SnapshotAccessError(f"{path}: permission denied ({exc.strerror}); check the permissions and "
                                  "owner of the snapshot path and its directory (ls -l), or run as the user "
                                  "that owns it") from None
    except OSError as exc:
        # ELOOP: a symlink under O_NOFOLLOW; ENXIO: a FIFO without reader or a socket; ENOTDIR/EISDIR: wrong kind
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR, errno.EISDIR):
            raise
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise exc from None
        raise refused(path, mode, expected) from None


def lstat(path: str) -> os.stat_result | None:
    """The entry itself (a link is not followed), or None if there is none."""
    try:
        with _checked(path, "entry"):
            return os.lstat(path)
    except FileNotFoundError:
        return None


def open_file(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open a regular file (flags may add O_RDWR/O_WRONLY, O_CREAT) without following a link or
    blocking on a FIFO; returns the descriptor (blocking again) and its fstat."""
    with _checked(path, "regular file"):
        fd = os.open(path, flags | _NO_LINK | os.O_NONBLOCK, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refused(path, info.st_mode, "regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_file(path: str, limit: int, what: str) -> bytes:
    """The content of a regular file of at most `limit` bytes (its size is checked before reading)."""
    fd, info = open_file(path)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise IntegrityError(f"{path}: {info.st_size} bytes, more than the {limit} expected of this {what}; "
                                 "corrupted, replaced or not written by pyckpt", file=path)
        data = f.read(info.st_size + 1)  # never more memory than the file holds (+1: it grew meanwhile)
    if len(data) > info.st_size:
        raise IntegrityError(f"{path}: grew while being read; a {what} written by pyckpt never changes in "
                             "place", file=path)
    return data


def reopen(fd: int, flags: int) -> int:
    """A second descriptor of the file open as fd (e.g. with O_DIRECT); OSError if /proc/self/fd does
    not lead to that same file."""
    new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    first, second = os.fstat(fd), os.fstat(new)
    if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):
        os.close(new)
        raise OSError(errno.ESTALE, f"/proc/self/fd/{fd} is not the file open as descriptor {fd}")
    return new


def create_file(path: str, mode: int = 0o644) -> int:
    """Create a new file for writing; an existing entry of that name (even a dangling link) is an error."""
    with _checked(path, "new file"):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_LINK, mode)


def write_new_file(path: str, data: bytes) -> None:
    """Create `path` with `data` and make it durable (fsync); if that fails, nothing is left there."""
    fd = create_file(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(path)  # ours: created exclusively above
        raise
    finally:
        os.close(fd)


def is_dir(path: str) -> bool:
    """Whether a real directory is at path (False if nothing is; a link or other entry is refused)."""
    return _is(path, stat.S_ISDIR, "directory")


def is_file(path: str) -> bool:
    """Whether a regular file is at path (False if nothing is; a link or other entry is refused)."""
    return _is(path, stat.S_ISREG, "regular file")


def _is(path: str, test, expected: str) -> bool:
    info = lstat(path)
    if info is not None and not test(info.st_mode):
        raise refused(path, info.st_mode, expected)
    return info is not None


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (read-only open: P's directory may be the user's link)."""
    with _checked(path, "directory"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_dir(path: str, *, user_dir: bool = False) -> list[str]:
    """The names in a real directory (a link or another kind of entry is refused). user_dir: the
    directory P is in, which is the user's and may be a link."""
    with _checked(path, "directory"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if user_dir else os.O_NOFOLLOW))
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def make_dir(path: str, mode: int) -> None:
    """Create a directory, or accept an existing real one (a link or a file there is refused)."""
    try:
        with _checked(path, "directory"):
            os.mkdir(path, mode)
    except FileExistsError:
        is_dir(path)  # refuses what is not a real directory


def make_dirs(path: str, mode: int) -> None:
    """make_dir with its missing parents, each with `mode` (os.makedirs gives parents 0o777 & ~umask).
    Existing parents are the user's and may be links."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        make_dirs(parent, mode)
    make_dir(path, mode)


def link_file(source: str, target: str) -> None:
    """Hard-link a regular file to a new name (a link or another kind of source is refused)."""
    is_file(source)  # refuses a link or another kind of source (a missing one fails in os.link)
    with _checked(target, "new file"):
        os.link(source, target, follow_symlinks=False)


def remove_file(path: str) -> None:
    """Unlink a regular file if it exists (a link or another kind of entry is refused)."""
    if not is_file(path):
        return
    try:
        with _checked(path, "regular file"):
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove_tree(path: str) -> None:
    """Remove a real directory and everything in it if it exists (a link or a file there is refused).

    Links inside are removed, never followed (shutil.rmtree works through directory descriptors).
    Errors are ignored: what stays (e.g. NFS's .nfs* files of a file still open) is a leftover the
    next writer or gc removes."""
    if is_dir(path):
        shutil.rmtree(path, ignore_errors=True)
