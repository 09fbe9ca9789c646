"""Whether a checkpoint folder can be trusted: llmuxd runs as root and CRIU restores what the
folder holds, so whoever can write there could run code as root.

The rule: the checkpoint folder, ``images_dir`` and every folder from there up to ``/`` are
owned by root (or llmuxd's own euid), are real directories (``lstat``: a symbolic link is
refused, never followed) and are not writable by group or others.  Above ``images_dir`` (or
above a model's own ``checkpoint_path``) a root-owned sticky directory such as /tmp is also
accepted: others may create names in it, but cannot rename or remove ours.  Inside the
checkpoint, the manifest, ``criu/`` and ``files/`` follow the same rule.

A folder that fails is refused as a whole, with the path and the command that fixes it, and is
left as it is: llmuxd never moves or deletes what it cannot prove is its own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class Untrusted(Exception):
    """A path that llmuxd will not use; ``fix`` is the command that makes it acceptable."""

    def __init__(self, path: Path | str, why: str, fix: str):
        self.path, self.why, self.fix = Path(path), why, fix
        super().__init__(f"{path} {why}; llmuxd refuses to use it (fix: `{fix}`)")


def owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def fix_for(path: Path | str, key: bool = False) -> str:
    who = "root:root" if os.geteuid() == 0 else str(os.geteuid())
    return f"chown {who} {path} && chmod {'600' if key else 'go-w'} {path}"


def normalized(path: Path | str) -> Path:
    """Absolute and lexically normalized (symbolic links are not resolved: they are refused)."""
    return Path(os.path.normpath(os.path.abspath(path)))


def _is_strict_ancestor(q: Path, base: Path) -> bool:
    return q != base and q in base.parents


def check_owned(path: Path, st: os.stat_result, *, directory: bool) -> None:
    """One entry: of the expected type (never a link), owned by root/euid, not group/other-writable."""
    kind = "directory" if directory else "regular file"
    if stat.S_ISLNK(st.st_mode):
        raise Untrusted(path, "is a symbolic link", f"replace {path} with a real {kind}")
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        raise Untrusted(path, f"is not a {kind}", f"rm -r {path}")
    if st.st_uid not in owners():
        raise Untrusted(path, f"is owned by uid {st.st_uid}, not root", fix_for(path))
    if st.st_mode & 0o022:
        raise Untrusted(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})", fix_for(path))


def check_tree(path: Path | str, base: Path | str) -> None:
    """``path`` and every folder above it (those that exist) by the rule; ``base`` is
    ``images_dir`` (or the checkpoint folder itself when it lies elsewhere): only strictly
    above it may a root-owned sticky directory (/tmp) be group/other-writable."""
    path, base = normalized(path), normalized(base)
    for q in [*reversed(path.parents), path]:
        try:
            st = os.lstat(q)
        except FileNotFoundError:
            return
        except OSError as e:
            raise Untrusted(q, f"cannot be examined ({e.strerror})", f"ls -ld {q}") from None
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_mode & stat.S_ISVTX and _is_strict_ancestor(q, base):
            continue  # /tmp: others may add names, never take ours
        check_owned(q, st, directory=True)


def check_inside(folder: Path, names: dict[str, bool]) -> None:
    """Entries of a checkpoint folder (name -> is a directory) by the rule, when present."""
    for name, directory in names.items():
        p = folder / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        check_owned(p, st, directory=directory)


def base_for(path: Path | str, images_dir: Path | str) -> Path:
    """The folder strictly above which a sticky directory is accepted."""
    path, images_dir = normalized(path), normalized(images_dir)
    return images_dir if images_dir in path.parents else path
