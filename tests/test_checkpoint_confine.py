"""A checkpoint's manifest is untrusted input: planted and malformed manifests are refused
before anything is written, and putting files back is confined (no link followed, no
predictable temporary, no set-id bit, only regular files read from the checkpoint, nothing
removed but what llmuxd put there).  Real daemons, real CRIU dumps, real files; every target
lies in the test's own folders, and each attack names a place outside them that must stay
untouched."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from checkpoint_kit import daemon, extra_model, golden, plant, snapshot  # noqa: F401
from harness import LLMUXD
from llmuxd.checkpoint.checkpointer import Checkpointer
from llmuxd.checkpoint.criu import Criu
from test_switching import metric

pytestmark = [pytest.mark.criu]


def complete(d, model, prompt="hello", n=4):
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _first(m, key):
    return next(iter(m[key]))


def _edit(key, value):
    def edit(m):
        m["saved"][0][key] = value
    return edit


def malformed(out: Path) -> dict:
    """name -> (manifest edit, words of the refusal).  ``out`` must stay empty."""
    def image_name(name):
        def edit(m):
            m["images"][name] = m["images"].pop(_first(m, "images"))
        return edit

    def set_(key, value):
        def edit(m):
            m[key] = value
        return edit

    return {
        "types": (set_("pids", ["1"]), "pids.0"),
        "missing_key": (lambda m: m.pop("images"), "images: Field required"),
        "extra_key": (set_("environ", {"HF_TOKEN": "x"}), "environ: Extra inputs"),
        "version": (set_("version", 1), "version 1 is not 3"),
        "not_json": (lambda m: b"{\"version\": 3, ", "not JSON"),
        "other_model": (set_("model", "someone-else"), "describes model 'someone-else'"),
        "digest_is_path": (_edit("blake3", "/etc/hostname"), "saved.0.blake3"),
        "digest_dotdot": (_edit("blake3", f"../../../../../../..{out}/x"), "saved.0.blake3"),
        "image_dotdot": (image_name(f"../../../../../..{out}/x.img"), "not a plain image file name"),
        "image_abs": (image_name("/etc/passwd"), "not a plain image file name"),
        "target_dotdot": (_edit("path", f"{out}/../{out.name}/pwned"), "not a normalized path"),
        "target_relative": (_edit("path", "tmp/pwned"), "not an absolute path"),
        "target_slashes": (_edit("path", f"{out}//pwned"), "not a normalized path"),
        "target_proc": (_edit("path", "/proc/llmuxd-test-never"), "/proc, /sys or /dev"),
        "target_dev": (_edit("path", "/dev/llmuxd-test-never"), "/proc, /sys or /dev"),
        "mode_type_bits": (_edit("mode", 0o100644), "saved.0.mode"),
        "negative_uid": (_edit("uid", -1), "saved.0.uid"),
    }


def test_malformed_manifests_are_refused_quarantined_and_counted(make_daemon, golden, tmp_path, expected):
    out = tmp_path / "outside"
    out.mkdir()
    cases = malformed(out)
    models = {}
    for name, (edit, _) in cases.items():
        plant(golden, tmp_path / name / "ck", edit, model=name)
        models[name] = extra_model(name, tmp_path / name / "ck")
    missing = plant(golden, tmp_path / "no_manifest" / "ck", model="no_manifest")
    (missing / "manifest.json").unlink()
    models["no_manifest"] = extra_model("no_manifest", missing)
    plant(golden, tmp_path / "ck" / "m1" / "images")  # a good one among them
    d = daemon(make_daemon, golden, tmp_path, models)
    st = d.status()["models"]
    for name, (_, words) in [*cases.items(), ("no_manifest", ("", "not a complete checkpoint"))]:
        err = st[name]["last_error"] or ""
        assert st[name]["state"] == "stopped" and words in err, (name, st[name])
        reason = "incomplete" if name == "no_manifest" else "invalid_manifest"
        assert metric(d, "llmuxd_restore_failures_total", model=name, reason=reason) == 1, name
        assert not (tmp_path / name / "ck").exists() and list((tmp_path / name).glob("ck.quarantine-*")), name
    assert list(out.iterdir()) == [] and not os.path.lexists("/dev/llmuxd-test-never")
    # the others go on: the good checkpoint restores, a refused model cold-starts
    assert st["m1"]["state"] == "checkpointed"
    assert complete(d, "m1", "a") == expected("m1", "a", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
    assert complete(d, "digest_is_path", "b") == expected("m1", "b", 4)
    assert d.status()["models"]["digest_is_path"]["last_wake_kind"] == "cold_start"
    assert complete(d, "m2", "c") == expected("m2", "c", 4)


def _add_saved(path: str, **changes):
    """An edit adding a saved file at ``path`` with the bytes of the first saved file."""
    def edit(m):
        m["saved"].append({**m["saved"][0], "kinds": ["fd"], "path": path, **changes})
    return edit


def _blob(ck: Path, golden) -> Path:
    return ck / "files" / golden.manifest()["saved"][0]["blake3"]


def test_prepare_restore_is_confined_and_goes_on_with_the_next_model(golden, tmp_path, sim_env, hf_home):
    out = tmp_path / "outside"
    out.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root-only secret")
    secret.chmod(0o600)
    victim = out / "victim"
    victim.write_text("victim")
    t = tmp_path / "targets"
    t.mkdir()
    (t / "link").symlink_to(out)  # a planted link on the way to a target
    (t / "final").symlink_to(victim)  # a planted link at a target
    (t / "sock").write_text("not a socket")
    size = golden.manifest()["saved"][0]["size"]
    blob_attacks = {
        "blob_symlink": lambda b: (b.unlink(), b.symlink_to(secret)),
        "blob_fifo": lambda b: (b.unlink(), os.mkfifo(b)),
        "blob_device": lambda b: (b.unlink(), os.mknod(b, stat.S_IFCHR | 0o600, os.makedev(1, 3))),
        "blob_tampered": lambda b: b.write_bytes(b"\x00" * size),
    }
    cases = {  # name -> (manifest edit, what the log says)
        "parent_link": (_add_saved(f"{t}/link/pwned"), "is a symbolic link or not a directory"),
        "socket_in_the_way": (lambda m: m["socket_paths"].append(f"{t}/sock"), "in the way of a unix socket"),
        **{name: (_add_saved(f"{t}/{name}"), "not a regular file" if name != "blob_tampered" else "BLAKE3")
           for name in blob_attacks},
        "final_link": (_add_saved(f"{t}/final"), "ready to restore"),
        "setid": (_add_saved(f"{t}/setid", mode=0o6755), "ready to restore"),
    }
    models, config = {}, {}
    for name, (edit, _) in cases.items():
        ck = plant(golden, tmp_path / name / "ck", edit, model=name)
        if name in blob_attacks:
            blob_attacks[name](_blob(ck, golden))
        models[name] = extra_model(name, ck)
    models["ok"] = extra_model("ok", plant(golden, tmp_path / "ok" / "ck", model="ok"))
    config = {"models": models, "log_dir": str(tmp_path / "logs"),
              "checkpoint": {"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = subprocess.run([LLMUXD, "prepare-restore", "--config", str(tmp_path / "config.json")], capture_output=True,
                       text=True, env=golden.env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    for name, (_, words) in cases.items():
        mine = [ln for ln in lines if f" {name}: " in ln]
        assert any(words in ln for ln in mine), (name, mine)
    assert any(" ok: " in ln and "ready to restore" in ln for ln in lines), r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["victim"] and victim.read_text() == "victim"
    assert (t / "link").is_symlink() and (t / "sock").read_text() == "not a socket"
    for name in blob_attacks:
        assert not os.path.lexists(t / name), name
    blob = golden.path / "files" / golden.manifest()["saved"][0]["blake3"]
    assert not (t / "final").is_symlink() and (t / "final").read_bytes() == blob.read_bytes()  # the link replaced
    assert stat.S_IMODE((t / "setid").stat().st_mode) == 0o755  # never set-id
    assert not [p for p in t.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_restore_never_writes_through_a_guessable_temporary_or_a_planted_link(make_daemon, golden, tmp_path,
                                                                              expected):
    out = tmp_path / "outside"
    out.mkdir()
    victim = out / "victim"
    victim.write_text("victim")
    t = tmp_path / "targets"
    t.mkdir()
    ck = plant(golden, tmp_path / "ck" / "m1" / "images", _add_saved(f"{t}/file"))
    d = daemon(make_daemon, golden, tmp_path)
    for pid in {d.proc.pid, *range(d.proc.pid, d.proc.pid + 64)}:  # the old `.NAME.llmuxd-<pid>` temporary
        os.symlink(victim, t / f".file.llmuxd-{pid}")
    assert complete(d, "m1", "g") == expected("m1", "g", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
    assert victim.read_text() == "victim"
    assert stat.S_ISREG(os.lstat(t / "file").st_mode) and (t / "file").read_bytes() == _blob(ck, golden).read_bytes()
    d.stop()
    # A link planted on the way to a target: refused (this container is in the way), the
    # checkpoint kept, nothing written outside; the model cold-starts and the others serve.
    (t / "file").unlink()
    os.rename(t, tmp_path / "real-targets")
    t.symlink_to(out)
    d.start()
    assert complete(d, "m1", "h") == expected("m1", "h", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and "symbolic link" in st["last_error"], st
    assert metric(d, "llmuxd_restore_failures_total", model="m1", reason="environment") == 1
    assert sorted(p.name for p in out.iterdir()) == ["victim"] and victim.read_text() == "victim"
    assert (ck / "manifest.json").exists() and not list(ck.parent.glob("*quarantine*"))
    assert complete(d, "m2", "i") == expected("m2", "i", 4)


@pytest.mark.parametrize("entry", ["stats_link", "unlisted_image", "image_link"])
def test_planted_entries_in_the_images_folder_are_refused_before_criu_runs(make_daemon, golden, tmp_path, expected,
                                                                           entry):
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    ck = plant(golden, tmp_path / "ck" / "m1" / "images")
    criu = ck / "criu"
    if entry == "stats_link":
        (criu / "stats-restore").symlink_to(victim)
    elif entry == "unlisted_image":
        (criu / "ghost-file-999.img").write_bytes(b"\0" * 64)
    else:
        img = criu / "inventory.img"
        os.rename(img, tmp_path / "inventory.img")
        img.symlink_to(tmp_path / "inventory.img")
    d = daemon(make_daemon, golden, tmp_path)
    assert complete(d, "m1", "j") == expected("m1", "j", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and "corrupt" in st["last_error"], st
    assert {"stats_link": "stats-restore: is a symbolic link", "unlisted_image": "ghost-file-999.img is not listed",
            "image_link": "inventory.img: is a symbolic link"}[entry] in st["last_error"]
    assert victim.read_bytes() == b"victim"
    assert list(ck.parent.glob("images.quarantine-*"))  # ours (a trusted folder), damaged: moved aside


def test_clean_up_after_a_failed_restore_removes_only_regular_files_it_put_there(tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep").write_text("keep")
    d = tmp_path / "placed"
    d.mkdir()
    (d / "ours").write_text("ours")
    (d / "link").symlink_to(out / "keep")
    (d / "dir").mkdir()
    (d / "not_placed").write_text("someone else's")
    (tmp_path / "via").symlink_to(out)
    ck = Checkpointer("m", tmp_path / "ck", Criu("criu"), None, tmp_path / "work")
    paths = [str(d / n) for n in ("ours", "link", "dir")] + [str(tmp_path / "via" / "keep")]
    ck._placed = list(paths)
    ck._transient = {*paths, str(d / "not_placed")}
    ck.clean_after_failure()
    assert not (d / "ours").exists()
    assert (d / "link").is_symlink() and (d / "dir").is_dir() and (d / "not_placed").exists()
    assert (out / "keep").read_text() == "keep"  # not through the link on the way either


def test_a_refused_restore_never_leaves_the_model_restoring(make_daemon, golden, tmp_path, expected):
    """Whatever a restore meets, the model ends awake (cold-started) or checkpointed, never
    in `restoring`: here the saved file's target folder is a file."""
    t = tmp_path / "targets"
    t.write_text("a file where a folder is needed")
    plant(golden, tmp_path / "ck" / "m1" / "images", _add_saved(f"{t}/file"))
    d = daemon(make_daemon, golden, tmp_path)
    before = snapshot(tmp_path / "ck")
    assert complete(d, "m1", "l") == expected("m1", "l", 4)
    st = d.status()["models"]["m1"]
    assert st["state"] == "awake" and st["last_wake_kind"] == "cold_start", st
    assert snapshot(tmp_path / "ck") == before  # kept as it was: the container is in the way


def test_the_manifest_contract_reads_what_it_writes_cuda_included(golden):
    """One writer, one reader: a dump's manifest (here with the CUDA facts a GPU dump records)
    decodes to the typed model and encodes back to the same bytes."""
    from llmuxd import cuda
    from llmuxd.checkpoint.model import ManifestError, decode, encode

    inv = cuda.parse_nvidia_smi("0, NVIDIA H200, GPU-1234, 143771, 140000, 570.86.15\n")
    m = golden.manifest()
    m.update(cuda=inv, cuda_pids=[7, 9], cuda_bytes={"GPU-1234": 5 << 30})
    typed = decode(json.dumps(m).encode())
    assert typed.cuda.gpus[0].name == "NVIDIA H200" and typed.cuda_bytes == {"GPU-1234": 5 << 30}
    assert decode(encode(typed)) == typed and encode(decode(encode(typed))) == encode(typed)
    with pytest.raises(ManifestError, match="cuda.gpus.0.index"):
        decode(json.dumps({**m, "cuda": {**inv, "gpus": [{**inv["gpus"][0], "index": "0"}]}}).encode())
