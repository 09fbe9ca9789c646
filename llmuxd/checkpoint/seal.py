"""Authenticity of a checkpoint: an HMAC-SHA256 tag over the manifest's exact bytes.

The manifest lists the BLAKE3 digest of every CRIU image and every saved file, so the tag covers
the whole checkpoint: images and blobs are verified against the manifest before CRIU runs or a
file is put back.  The key is read from ``checkpoint.key_file``, a root-only file.  The tag is kept
next to the manifest (``manifest.mac``) as ``hmac-sha256:<hex>``; it is checked before the
manifest is even parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from .trust import Untrusted, check_tree, fix_for

SCHEME = "hmac-sha256"
DOMAIN = b"llmuxd checkpoint manifest v2\0"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


class Unauthenticated(Exception):
    """The checkpoint carries no valid tag for the configured key."""


def load_key(key_file: str | Path) -> bytes:
    """The key; Untrusted when the file (or a folder above it) could be read or replaced by
    someone other than root/llmuxd, or is not a plausible key."""
    path = Path(os.path.abspath(key_file))
    check_tree(path.parent, base=path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise Untrusted(path, f"cannot be opened ({e.strerror}; a symbolic link is refused)",
                        f"install -m 600 -o root -g root KEYFILE {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(path, "is not a regular file", f"install -m 600 -o root -g root KEYFILE {path}")
        if st.st_uid not in (0, os.geteuid()):
            raise Untrusted(path, f"is owned by uid {st.st_uid}", fix_for(path, key=True))
        if st.st_mode & 0o077:
            raise Untrusted(path, f"is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                            fix_for(path, key=True))
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    key = data.strip()
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise Untrusted(path, f"holds {len(key)} bytes; a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes",
                        f"head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}")
    return key


def tag(key: bytes, manifest: bytes) -> str:
    return f"{SCHEME}:{hmac.new(key, DOMAIN + manifest, hashlib.sha256).hexdigest()}"


def verify(key: bytes, manifest: bytes, stored: bytes | None) -> None:
    if stored is None:
        raise Unauthenticated("the checkpoint has no authentication tag (manifest.mac) and checkpoint.key_file is set")
    if not hmac.compare_digest(stored.strip(), tag(key, manifest).encode()):
        raise Unauthenticated("the checkpoint's authentication tag does not match its manifest "
                              "(tampered, or made with another key)")
