"""Writing, creating and removing the files a checkpoint names, confined: no symbolic link is
ever followed, no predictable name is ever used, nothing but what was recorded is removed.

* a directory is reached by walking from ``/`` one component at a time
  (``O_DIRECTORY|O_NOFOLLOW``, ``dir_fd``): a symlink anywhere on the way is refused;
* a file is written into a private temporary in its target folder
  (``O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW``, random name), hashed (BLAKE3) while copied — only its
  data extents: holes stay holes —, given its owner, permission bits (never set-id or sticky) and
  times on the descriptor, then renamed into place;
* only a regular file is unlinked, where a regular file was recorded.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from typing import Callable, Iterator

from . import digest

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
PERM = 0o777  # what is applied of a recorded mode: never setuid, setgid or sticky


class Unsafe(Exception):
    """A path cannot be reached or written without following a link, or something else is in
    the way: the container differs from what the checkpoint needs."""


class DigestMismatch(Exception):
    """What was copied does not hash to the digest it is stored under."""


def _split(path: str) -> list[str]:
    if not path.startswith("/"):
        raise Unsafe(f"{path}: not an absolute path")
    return [p for p in path.split("/") if p]


def open_dir(path: str, create: int | None = None) -> int:
    """A descriptor of directory ``path``, walked from ``/`` without following links; missing
    components are created with mode ``create`` (exactly, whatever the umask) when given."""
    fd = os.open("/", DIR_FLAGS)
    walked = ""
    try:
        for name in _split(path):
            walked += "/" + name
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False
                nfd = _open_walked(name, fd, walked)
                if made:
                    os.fchmod(nfd, create)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise Unsafe(f"{walked} is a symbolic link or not a directory (never followed)") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_walked(name: str, dir_fd: int, walked: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise Unsafe(f"{walked} is a symbolic link or not a directory (never followed)") from None
        raise


@contextmanager
def parent_of(path: str, create: int | None = None) -> Iterator[tuple[int, str]]:
    """(descriptor of the parent folder, final name) of ``path``."""
    parts = _split(path)
    if not parts:
        raise Unsafe("/ is not a file")
    fd = open_dir("/" + "/".join(parts[:-1]), create)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def lstat(path: str) -> os.stat_result | None:
    """``lstat`` reached without following links; None when missing or not reachable."""
    try:
        with parent_of(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError, Unsafe):
        return None


def open_regular(name: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a file that must be a regular file (not a link, FIFO or device: checked with lstat
    before it is opened, and the descriptor checked to be that same file)."""
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(before.st_mode):
        raise Unsafe(f"{name} is not a regular file")
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Unsafe(f"{name} changed while it was opened")
    return fd, st


def copy_hashing(src: int, dst: int, size: int, digester: digest.Digester | None = None) -> str:
    """Copy ``size`` bytes from ``src`` to ``dst`` and return their BLAKE3 (of the logical
    content: holes hash as zeros).  Only data extents are read and written: ``dst`` is first
    truncated to ``size``, so a hole of ``src`` stays a hole (a 252 MB /dev/shm ring holding
    45 KB copies 45 KB).  The bytes are read once into memory, hashed there and written from
    there (``copy_file_range`` would copy in the kernel, but the hash needs them here anyway).
    DigestMismatch when ``src`` ends early."""
    own = digester is None
    d = digester or digest.Digester(1)
    h = digest.new()
    try:
        os.ftruncate(dst, size)
        for start, end, data in digest.extents(src, size):
            if not data:
                digest.update_zeros(h, end - start)
                continue
            off = start
            for chunk in d.chunks(src, start, end):
                h.update(chunk)
                view = chunk
                while view:
                    n = os.pwrite(dst, view, off)
                    view, off = view[n:], off + n
    except digest.ShortRead as e:
        raise DigestMismatch(f"source ended early: {e.strerror}") from None
    finally:
        if own:
            d.close()
    return h.hexdigest()


def put_file(path: str, src: int, *, size: int, blake3: str, mode: int, uid: int, gid: int,
             atime_ns: int, mtime_ns: int, marked: Callable[[int], object] | None = None) -> None:
    """Write ``path`` from ``src`` (``size`` bytes that must hash to ``blake3``, holes kept as
    holes) atomically; ``marked(fd)`` is called on the new file before it takes its name."""
    with parent_of(path, create=0o755) as (dfd, name):
        tmp = f".llmuxd-{secrets.token_hex(16)}"
        out = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
        try:
            try:
                got = copy_hashing(src, out, size)
                if got != blake3:
                    raise DigestMismatch(f"the saved copy of {path} does not match its {digest.ALGORITHM} digest "
                                         f"(it has {got})")
                _own(out, uid, gid)
                os.fchmod(out, mode & PERM)
                os.utime(out, ns=(atime_ns, mtime_ns))
                if marked is not None:
                    marked(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _unlink_quietly(tmp, dfd)
            raise


def create_empty(path: str, *, mode: int, uid: int, gid: int) -> bool:
    """Create ``path`` empty unless something is there already; returns whether it was made."""
    with parent_of(path, create=0o755) as (dfd, name):
        try:
            fd = os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
        except FileExistsError:
            return False
        try:
            _own(fd, uid, gid)
            os.fchmod(fd, mode & PERM)
        finally:
            os.close(fd)
        return True


def make_dir(path: str, *, mode: int = 0o755, uid: int | None = None, gid: int | None = None) -> bool:
    """Create directory ``path`` (and what is missing above it) unless it exists; a link or a
    non-directory in the way is refused.  Returns whether it was made."""
    with parent_of(path, create=0o755) as (dfd, name):
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            os.close(_open_walked(name, dfd, path))
            return False
        fd = _open_walked(name, dfd, path)
        try:
            if uid is not None and gid is not None:
                _own(fd, uid, gid)
            os.fchmod(fd, mode & PERM)
        finally:
            os.close(fd)
        return True


def unlink_regular(path: str) -> bool:
    """Unlink ``path`` only if it is (still) a regular file; links are never followed, folders
    never removed.  Returns whether it was removed."""
    try:
        with parent_of(path) as (dfd, name):
            if not stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                return False
            os.unlink(name, dir_fd=dfd)
            return True
    except (OSError, Unsafe):
        return False


def _own(fd: int, uid: int, gid: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        pass


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def secure_tree(top: str) -> None:
    """Folders 0700 and regular files 0600 under ``top`` (a folder of our own), links never followed."""
    for _root, _dirs, files, rootfd in os.fwalk(top, follow_symlinks=False):
        os.fchmod(rootfd, 0o700)
        for name in files:
            try:
                fd, _ = open_regular(name, rootfd)
            except (Unsafe, OSError):
                continue
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
