"""What a dump wrote, described: the manifest of CRIU's images and of what the tree needs saved,
with the images hashed (BLAKE3) and synced on threads of their own while the images are decoded
and the saved files copied.  Run in a worker thread by :meth:`.checkpointer.Checkpointer.dump`."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

from . import digest, remaps, safefs
from .fsview import FsView
from .images import read_images
from .manifest import DumpFacts, build, digest_images
from .model import Manifest
from .store import BLOBS


def describe_dump(images: Path, partial: Path, facts: DumpFacts, t: dict[str, float],
                  growing: digest.Growing | None = None) -> Manifest:
    """The manifest of what CRIU wrote, and everything it needs written and synced: the
    images hashed and synced on threads of their own while the images are read and the saved
    files copied (the two never wait for each other until the manifest takes the images'
    records).  ``growing``: the images hashed while CRIU wrote them, hashed on from there."""
    with digest.Digester() as d:
        hashing: Future = d.background(_timed, t, "digest_images", digest_images, images, d, growing)
        waited = 0.0

        def image_records() -> dict[str, dict]:
            nonlocal waited
            since = time.monotonic()
            try:
                return hashing.result()
            finally:
                waited = time.monotonic() - since

        try:
            started = time.monotonic()
            needs = read_images(images)
            t["read_images"] = time.monotonic() - started
            started = time.monotonic()
            manifest = build(needs, image_records, partial / BLOBS, FsView(), facts, d)
            for r in manifest.link_remaps:  # CRIU made them for this dump: ours
                remaps.mark(r.path, facts.port)
            safefs.secure_tree(str(partial))  # what CRIU wrote besides the images (its log): 0600 too
            t["save_files"] = time.monotonic() - started - waited  # not counting the wait for the images
        finally:
            try:  # never leave the hashing running over a folder that is about to be removed
                hashing.result()
            except Exception:  # noqa: BLE001 - the first error is the one raised
                pass
    return manifest


def _timed(t: dict[str, float], key: str, fn, *args):
    started = time.monotonic()
    try:
        return fn(*args)
    finally:
        t[key] = time.monotonic() - started
