"""BLAKE3 digests, hole-aware copies and durability of a checkpoint's own files, attacked on
temporary folders only: no daemon, no CRIU, nothing outside the test's own folders (never
/dev/shm).  A checkpoint is made the way a dump makes it (``digest_images`` over an images
folder, ``build`` saving a runtime file, ``write_manifest``), read back by ``inspect`` and put
back by ``apply`` — then damaged."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import blake3
import pytest

from llmuxd.checkpoint import digest, safefs
from llmuxd.checkpoint.images import FileNeed, ImageNeeds, Process
from llmuxd.checkpoint.manifest import DumpFacts, build, digest_images
from llmuxd.checkpoint.model import VERSION, ManifestError, decode, encode
from llmuxd.checkpoint.prepare import Unusable, apply, check_images
from llmuxd.checkpoint.store import BLOBS, IMAGES, Settings, inspect, write_manifest

MIB = 1 << 20


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    """A file of ``size`` bytes, holes but for ``pieces`` (offset -> bytes); returns its content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return path.read_bytes()


def _reference(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# -- the digest itself -------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_digest_of_sparse_and_dense_files_is_blake3_of_their_content(tmp_path, threads):
    sparse = _sparse(tmp_path / "sparse", 40 * MIB + 123, {0: b"a" * 10, 5 * MIB - 3: os.urandom(9 * MIB),
                                                           40 * MIB + 100: b"tail"})
    dense = os.urandom(3 * digest.CHUNK + 77)
    (tmp_path / "dense").write_bytes(dense)
    (tmp_path / "empty").write_bytes(b"")
    with digest.Digester(threads) as d:
        for name, data in (("sparse", sparse), ("dense", dense), ("empty", b"")):
            fd = os.open(tmp_path / name, os.O_RDONLY)
            try:
                assert d.hash_fd(fd, len(data)) == _reference(data), name
            finally:
                os.close(fd)


def test_extents_cover_the_file_in_order_and_find_its_holes(tmp_path):
    size = 64 * MIB
    _sparse(tmp_path / "f", size, {8 * MIB: b"x" * 4096, size - 4096: b"y" * 4096})
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        parts = list(digest.extents(fd, size))
    finally:
        os.close(fd)
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    data = sum(e - s for s, e, is_data in parts if is_data)
    assert data < 4 * MIB, parts  # holes found: not read


# -- saved files: copied and put back hole-aware -----------------------------------------------
class _RuntimeView:
    """Every file is one a new container lacks (the classification is not under test)."""

    epoch = 0.0

    def origin(self, path, st):
        return "runtime"


def _needs(*paths: str) -> ImageNeeds:
    return ImageNeeds(root_pid=10, pidns=False, processes=[Process(10, 1, 10, 10, [10, 11])],
                      files=[FileNeed(path=p, kinds=["fd", "mmap"], pids=[10], flags=[2], append_only=False,
                                      size=None, mode=None, build_id=None, is_dir=False, ftype="reg")
                             for p in paths],
                      unix_sockets=[], abstract_unix_sockets=[], inet_sockets=[], remaps=[], tcp_established=False,
                      unknown=[], fd_types={"REG": len(paths)}, pages_bytes=0, image_files=[])


RING = 256 * MIB


@pytest.fixture
def made(tmp_path):
    """A checkpoint of a tree that had one sparse ring file (a /dev/shm ring as vLLM leaves it,
    here in a temporary folder) open, made as a dump makes it.  Returns (found, ring path,
    ring content, the images' content by name)."""
    run = tmp_path / "run"
    run.mkdir()
    ring = run / "ring"
    content = _sparse(ring, RING, {0: os.urandom(4096), RING // 2: os.urandom(40960), RING - 10: b"0123456789"})
    os.chmod(ring, 0o640)
    if os.geteuid() == 0:
        os.chown(ring, 1234, 4321)
    os.utime(ring, ns=(1_600_000_000_000_000_000, 1_700_000_000_123_456_789))
    ck = tmp_path / "ck" / "m"
    ck.mkdir(parents=True, mode=0o700)
    images = ck / IMAGES
    images.mkdir(mode=0o700)
    imgs = {"inventory.img": os.urandom(300), "pages-1.img": os.urandom(2 * digest.CHUNK + 5),
            "core-10.img": b""}
    for name, data in imgs.items():
        (images / name).write_bytes(data)
    (images / "dump.log").write_text("criu's log: hashed? no; synced and private: yes\n")
    facts = DumpFacts(model="m", eviction="discard+checkpoint", served_name="m", port=18001, argv=["vllm"],
                      canary=None, sleep_level=None)
    with digest.Digester() as d:
        records = digest_images(images, d)
        manifest = build(_needs(str(ring)), lambda: records, ck / BLOBS, _RuntimeView(), facts, d)
    write_manifest(ck, manifest, None)
    found = inspect("m", ck, Settings(tmp_path / "ck"))
    assert found.state == "valid", found.detail
    return found, ring, content, imgs


def test_a_dump_records_blake3_of_images_and_saved_files_and_keeps_them_private(made):
    found, ring, content, imgs = made
    m = found.manifest
    assert m.version == VERSION == 3
    assert {n: (r.size, r.blake3) for n, r in m.images.items()} == {n: (len(d), _reference(d)) for n, d in imgs.items()}
    images = found.path / IMAGES
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in images.iterdir())  # dump.log too
    (saved,) = m.saved
    assert saved.blake3 == _reference(content) and saved.size == RING
    blob = found.path / BLOBS / saved.blake3
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600 and blob.read_bytes() == content
    assert blob.stat().st_blocks * 512 < 4 * MIB  # the blob keeps the ring's holes
    assert "sha256" not in json.dumps(json.loads((found.path / "manifest.json").read_bytes()))


def test_several_saved_files_are_saved_at_once_in_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name, data in (("big", os.urandom(5 * MIB + 1)), ("empty", b""), ("tiny", b"abc")):
        (run / name).write_bytes(data)
    _sparse(run / "sparse", 9 * MIB, {MIB: b"z" * 100})
    contents = {str(run / n): (run / n).read_bytes() for n in ("big", "empty", "tiny", "sparse")}
    (tmp_path / "criu").mkdir()
    facts = DumpFacts(model="m", eviction="discard+checkpoint", served_name="m", port=18001, argv=[], canary=None,
                      sleep_level=None)
    with digest.Digester(4) as d:
        m = build(_needs(*contents), lambda: {}, tmp_path / BLOBS, _RuntimeView(), facts, d)
    assert [r.path for r in m.saved] == list(contents)
    for r in m.saved:
        assert r.blake3 == _reference(contents[r.path]) and r.size == len(contents[r.path])
        assert (tmp_path / BLOBS / r.blake3).read_bytes() == contents[r.path]
    assert not [p for p in (tmp_path / BLOBS).iterdir() if p.name.startswith(".")]


def test_a_sparse_file_is_put_back_byte_exact_with_its_holes_mode_owner_and_times(made):
    found, ring, content, _ = made
    before = os.stat(ring)
    ring.unlink()
    done = apply(found)
    assert done.done == [f"restored {ring} ({RING} bytes)"]
    st = os.stat(ring)
    assert ring.read_bytes() == content
    assert st.st_blocks * 512 < 4 * MIB, st.st_blocks  # 256 MiB logical, a few pages allocated
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == before.st_mtime_ns
    assert (st.st_uid, st.st_gid) == (before.st_uid, before.st_gid)
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert not [p for p in ring.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    assert apply(found).done == []  # in place: left alone


def test_a_blob_whose_blake3_differs_is_refused_and_nothing_is_put_in_place(made):
    found, ring, content, _ = made
    (saved,) = found.manifest.saved
    blob = found.path / BLOBS / saved.blake3
    with open(blob, "r+b") as f:  # same size, one byte in a hole changed
        f.seek(RING // 4)
        f.write(b"\1")
    ring.unlink()
    with pytest.raises(Unusable, match="does not match its BLAKE3 digest"):
        apply(found)
    assert not ring.exists() and not [p for p in ring.parent.iterdir() if p.name.startswith(".")]


def test_put_file_refuses_a_wrong_digest_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"hello")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(safefs.DigestMismatch, match="BLAKE3"):
            safefs.put_file(str(tmp_path / "out" / "f"), fd, size=5, blake3="0" * 64, mode=0o644, uid=0, gid=0,
                            atime_ns=0, mtime_ns=0)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "out") == []


def test_a_planted_symlink_on_the_way_to_a_put_back_is_refused(made, tmp_path):
    found, ring, content, _ = made
    outside = tmp_path / "outside"
    outside.mkdir()
    ring.unlink()
    os.rename(ring.parent, tmp_path / "real-run")
    ring.parent.symlink_to(outside)
    with pytest.raises(safefs.Unsafe, match="symbolic link"):
        apply(found)
    assert list(outside.iterdir()) == []


def test_a_planted_symlink_at_a_put_back_is_replaced_never_followed(made, tmp_path):
    found, ring, content, _ = made
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    ring.unlink()
    ring.symlink_to(victim)
    apply(found)
    assert victim.read_bytes() == b"victim"
    assert stat.S_ISREG(os.lstat(ring).st_mode) and ring.read_bytes() == content


# -- images: verified before a restore ---------------------------------------------------------
def test_images_verify_and_damage_is_named(made):
    found, *_ = made
    images = found.path / IMAGES
    assert check_images(found) == []
    with open(images / "pages-1.img", "r+b") as f:
        f.seek(digest.CHUNK + 1)
        byte = f.read(1)
        f.seek(digest.CHUNK + 1)
        f.write(bytes([byte[0] ^ 1]))
    os.truncate(images / "inventory.img", 100)
    os.unlink(images / "core-10.img")
    (images / "core-10.img").symlink_to(images / "dump.log")
    problems = check_images(found)
    assert "image pages-1.img is corrupt (BLAKE3 differs)" in problems
    assert "image inventory.img is 100 bytes, 300 recorded (truncated?)" in problems
    assert any("core-10.img: is a symbolic link" in p for p in problems), problems


# -- the manifest: version 3, BLAKE3 fields; older ones refused with the reason --------------
def _older(found) -> bytes:
    m = json.loads(encode(found.manifest))
    m["version"] = 2
    for rec in [*m["saved"], *m["link_remaps"], *m["images"].values()]:
        rec["sha256"] = rec.pop("blake3")
    return json.dumps(m).encode()


def test_a_manifest_of_an_older_llmuxd_is_refused_with_the_reason(made):
    found, *_ = made
    old = _older(found)
    with pytest.raises(ManifestError, match=r"manifest version 2 is not 3 \(made by an older llmuxd, "
                                            r"with SHA-256 digests: not restored\)"):
        decode(old)
    (found.path / "manifest.json").write_bytes(old)
    again = inspect("m", found.path, Settings(found.path.parent))
    assert again.state == "invalid" and again.reason == "invalid_manifest"
    assert "manifest version 2 is not 3 (made by an older llmuxd" in again.detail


def test_digest_fields_are_blake3_only(made):
    found, *_ = made
    m = json.loads(encode(found.manifest))
    m["saved"][0]["sha256"] = m["saved"][0]["blake3"]
    with pytest.raises(ManifestError, match="saved.0.sha256: Extra inputs"):
        decode(json.dumps(m).encode())
    m = json.loads(encode(found.manifest))
    m["images"]["pages-1.img"]["blake3"] = "../../etc/passwd"
    with pytest.raises(ManifestError, match="not a BLAKE3 digest"):
        decode(json.dumps(m).encode())


def test_images_verify_the_same_on_several_threads(made):
    found, *_ = made
    with digest.Digester(4) as d:
        assert check_images(found, d) == []
    os.truncate(found.path / IMAGES / "pages-1.img", 10)
    with digest.Digester(4) as d:
        assert check_images(found, d) == [f"image pages-1.img is 10 bytes, {2 * digest.CHUNK + 5} recorded (truncated?)"]


# -- durability helpers ------------------------------------------------------------------------
def test_writeback_kicks_growing_regular_files_only_and_never_follows_a_link(tmp_path):
    from llmuxd.checkpoint.durable import MIN_STEP, Writeback, fsync_dir

    folder = tmp_path / "criu"
    folder.mkdir()
    (folder / "pages-1.img").write_bytes(os.urandom(2 * MIN_STEP))
    (folder / "small.img").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.write_bytes(os.urandom(2 * MIN_STEP))
    (folder / "link.img").symlink_to(outside)
    os.mkfifo(folder / "fifo")  # never opened: a FIFO would block
    w = Writeback(folder)
    w.kick()
    assert w.kicked == {"pages-1.img": 2 * MIN_STEP}
    with open(folder / "pages-1.img", "ab") as f:
        f.write(os.urandom(MIN_STEP))
    w.kick()
    assert w.kicked == {"pages-1.img": 3 * MIN_STEP}
    fsync_dir(folder)
    Writeback(tmp_path / "missing").kick()  # nothing there yet: nothing done, no error


def test_writeback_runs_pass_after_pass_until_told_to_stop(tmp_path):
    import asyncio

    from llmuxd.checkpoint.durable import MIN_STEP, Writeback

    w = Writeback(tmp_path)

    async def dump() -> None:  # a "CRIU" writing for a while, then done
        done = asyncio.Event()
        task = asyncio.create_task(w.run(done))
        for i in range(3):
            (tmp_path / f"pages-{i}.img").write_bytes(os.urandom(MIN_STEP))
            await asyncio.sleep(0.15)
        done.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(dump())
    assert set(w.kicked) >= {"pages-0.img", "pages-1.img"}


def test_images_hashed_while_they_grow_give_the_digest_of_the_whole_file(tmp_path):
    """A dump hashes CRIU's pages images as CRIU appends to them (durable.Writeback's passes):
    whatever the passes saw, the digest recorded is BLAKE3 of the final file, as if hashed whole;
    a file replaced meanwhile is hashed again from its start; a file the passes never saw or
    that shrank below what they hashed is hashed whole."""
    images = tmp_path / "images"
    images.mkdir()
    grown, replaced, shrunk, unseen = (images / n for n in ("pages-1.img", "pages-2.img", "pages-3.img",
                                                             "pages-4.img"))
    growing = digest.Growing()
    data = {p: b"" for p in (grown, replaced, shrunk)}

    def write(p, more):  # CRIU appends; a pass follows now and then
        with open(p, "ab") as f:
            f.write(more)
        data[p] = data.get(p, b"") + more

    def one_pass():
        for p in (grown, replaced, shrunk):
            fd = os.open(p, os.O_RDONLY)
            try:
                growing.advance(fd, p.name, os.fstat(fd))
            finally:
                os.close(fd)

    for i in range(5):
        for p in (grown, replaced, shrunk):
            write(p, os.urandom(3 * digest.CHUNK // 2 + i))
        one_pass()
    replaced.unlink()  # a new file under the same name: what was hashed of the old one is void
    data[replaced] = b""
    write(replaced, os.urandom(1000))
    os.truncate(shrunk, 10)
    data[shrunk] = data[shrunk][:10]
    write(grown, b"tail")
    unseen.write_bytes(b"x" * 5000)
    data[unseen] = b"x" * 5000
    assert growing.hashed >= 5 * 3 * digest.CHUNK
    records = digest_images(images, digest.Digester(), growing)
    for p, content in data.items():
        assert records[p.name] == {"size": len(content), "blake3": blake3.blake3(content).hexdigest()}, p.name
