"""Trust of the checkpoint folder: llmuxd runs as root and CRIU restores what the folder holds.

Real daemons, real CRIU dumps of simulator trees, real files: folders owned by someone else,
writable by others, reached through symbolic links are refused and left exactly as they were;
checkpoints are private whatever the umask; with a key, a checkpoint whose tag does not match
its manifest is refused; argv secrets never reach the manifest."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess

import httpx
import pytest

from checkpoint_kit import SECRET_ARG, daemon, extra_model, golden, plant, snapshot  # noqa: F401
from harness import LLMUXD, free_ports
from test_switching import metric

pytestmark = [pytest.mark.criu]
NOBODY = 65534


def complete(d, model, prompt="hello", n=4):
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def modes(folder):
    return {str(p.relative_to(folder.parent)): stat.S_IMODE(os.lstat(p).st_mode) for p in [folder, *folder.rglob("*")]}


def test_checkpoints_are_private_whatever_the_umask_and_hold_no_secret(make_daemon, tmp_path, expected):
    d = make_daemon(models={"m1": {"model_path": "test-org/tiny-a", "port": free_ports(1)[0],
                                   "eviction": {"weights": "discard", "process": "checkpoint"},
                                   "extra_args": ["--hf-token", SECRET_ARG]}},
                    checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")}, start=False)
    (tmp_path / "logs").mkdir(mode=0o755)  # the backends' log folder is not what this test is about
    d.argv_prefix = ["sh", "-c", 'umask 000 && exec "$@"', "umask-000"]
    d.start()
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    ck = tmp_path / "ck"
    got = modes(ck)
    dirs = {k: v for k, v in got.items() if stat.S_ISDIR(os.lstat(tmp_path / k).st_mode)}
    files = {k: v for k, v in got.items() if k not in dirs}
    assert set(dirs.values()) == {0o700}, dirs  # images_dir and the model's folder are llmuxd's too
    assert files and set(files.values()) == {0o600}, files
    assert len([k for k in files if "/criu/" in k]) > 5 and any("/files/" in k for k in files)
    text = (ck / "m1" / "images" / "manifest.json").read_text()
    manifest = json.loads(text)
    assert SECRET_ARG not in text and "--hf-token" in manifest["argv"] and "<redacted>" in manifest["argv"]
    assert not {"env", "environ", "environment"} & set(manifest)
    assert not (ck / "m1" / "images" / "manifest.mac").exists()  # no key: no tag, none needed
    assert complete(d, "m1", "p") == expected("m1", "p", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"


def test_the_golden_manifest_holds_no_secret(golden):
    text = (golden.path / "manifest.json").read_text()
    assert SECRET_ARG not in text and "<redacted>" in json.loads(text)["argv"]


REFUSED = {
    # name: (how the folder is spoiled, which path the refusal names, the fix it prints)
    "owner": ("the checkpoint folder belongs to nobody", "ck", "chown root:root"),
    "otherw": ("the checkpoint folder is writable by others", "ck", "chmod go-w"),
    "groupw": ("a folder above it is group-writable", "", "chmod go-w"),
    "parent_owner": ("a folder above it belongs to nobody", "", "chown root:root"),
    "link": ("the checkpoint folder is a symbolic link", "ck", "symbolic link"),
    "parent_link": ("a folder above it is a symbolic link", "p", "symbolic link"),
    "sticky_nobody": ("a sticky world-writable folder above it belongs to nobody", "", "chown root:root"),
}


def _spoil(kind, base):
    """A checkpoint folder for model ``kind`` under ``base``, spoiled as REFUSED says; returns
    (checkpoint_path, the folder that must be left intact)."""
    ck = base / "ck"
    if kind == "owner":
        os.chown(ck, NOBODY, NOBODY)
    elif kind == "otherw":
        os.chmod(ck, 0o707)
    elif kind == "groupw":
        os.chmod(base, 0o770)
    elif kind == "parent_owner":
        os.chown(base, NOBODY, NOBODY)
    elif kind == "sticky_nobody":
        os.chmod(base, 0o1777)
        os.chown(base, NOBODY, NOBODY)
    elif kind == "link":
        os.rename(ck, base / "real")
        os.symlink(base / "real", ck)
    elif kind == "parent_link":
        (base / "realp").mkdir()
        os.rename(ck, base / "realp" / "ck")
        os.symlink(base / "realp", base / "p")
        return base / "p" / "ck", base
    return ck, base


def test_untrusted_checkpoint_folders_are_refused_and_left_intact(make_daemon, golden, tmp_path, expected):
    models, intact, paths = {}, {}, {}
    for kind in [*REFUSED, "sticky_root"]:
        base = tmp_path / kind
        plant(golden, base / "ck", model=kind)
        if kind == "sticky_root":  # /tmp's shape above the checkpoint: accepted
            os.chmod(base, 0o1777)
            path = base / "ck"
        else:
            path, _ = _spoil(kind, base)
        paths[kind] = path
        models[kind] = extra_model(kind, path, "checkpoint" if kind == "owner" else "keep_running")
    intact = {k: snapshot(tmp_path / k) for k in REFUSED}
    d = daemon(make_daemon, golden, tmp_path, models)
    st = d.status()["models"]
    # Accepted by the trust rule: found valid (no failure counted, no error), then left for the
    # next dump only because it was made for another model's command line (port, arguments).
    sticky = st["sticky_root"]
    assert sticky["last_error"] is None and sticky["restore_failures"] == 0, sticky
    assert f"the checkpoint at {paths['sticky_root']} was made with another command line" in d.log()
    for kind, (what, named, fix) in REFUSED.items():
        assert st[kind]["state"] == "stopped", (what, st[kind])
        err = st[kind]["last_error"]
        assert "untrusted" in err and fix in err and f"{tmp_path / kind / named if named else tmp_path / kind} " in err, \
            (what, err)
        assert metric(d, "llmuxd_restore_failures_total", model=kind, reason="untrusted") == 1, what
        assert snapshot(tmp_path / kind) == intact[kind], f"{what}: folder changed"
        assert not list((tmp_path / kind).rglob("*quarantine*")), what
    # The refused model cold-starts; its next sleep cannot write there either (never replaces
    # a folder that is not ours); the others are served all along.
    assert complete(d, "owner", "x") == expected("m1", "x", 4)
    r = d.control("sleep", "owner").json()
    assert r["state"] == "stopped" and "escalated to stop" in r["last_error"] and "uid 65534" in r["last_error"], r
    assert snapshot(tmp_path / "owner") == intact["owner"]
    assert complete(d, "m2", "y") == expected("m2", "y", 4)
    assert complete(d, "m1", "z") == expected("m1", "z", 4)
    # inspect-checkpoint applies the same rule.
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(paths["otherw"])], capture_output=True, text=True)
    assert r.returncode == 1 and "writable by group or others" in r.stderr and "chmod go-w" in r.stderr, r.stderr
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(paths["sticky_root"])], capture_output=True, text=True)
    assert r.returncode == 0 and "restorable here" in r.stdout, r.stdout + r.stderr


def test_a_criu_work_folder_others_can_write_is_refused(make_daemon, golden, tmp_path, expected):
    """CRIU, as root, writes its log, pidfile and stats into its work folder (log_dir/criu/MODEL)
    through whatever it finds there: a folder others can write is refused, nothing is written
    through a link planted in it, and the model cold-starts (its checkpoint kept)."""
    ck = plant(golden, tmp_path / "ck" / "m1" / "images")
    work = tmp_path / "logs" / "criu" / "m1"
    work.mkdir(parents=True)
    os.chmod(work, 0o777)
    victim = tmp_path / "victim"
    victim.write_text("victim")
    os.symlink(victim, work / "stats-restore")
    os.symlink(victim, work / "restore.log")
    d = daemon(make_daemon, golden, tmp_path)
    assert d.status()["models"]["m1"]["state"] == "checkpointed"
    assert complete(d, "m1", "w") == expected("m1", "w", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and f"{work} is writable by group or others" in st["last_error"], st
    assert "chmod go-w" in st["last_error"] and victim.read_text() == "victim"
    assert (work / "stats-restore").is_symlink() and (ck / "manifest.json").exists()
    assert metric(d, "llmuxd_restore_failures_total", model="m1", reason="untrusted") == 1
    d.stop()
    os.chmod(work, 0o755)  # fixed as the message says: restored
    d.start()
    assert complete(d, "m1", "v") == expected("m1", "v", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore" and victim.read_text() == "victim"


def _key(path, mode=0o600, owner=0):
    path.write_bytes(secrets.token_hex(32).encode())
    os.chmod(path, mode)
    os.chown(path, owner, owner)
    return path


def test_key_authenticates_the_manifest_and_through_it_every_image(make_daemon, golden, tmp_path, expected):
    key = _key(tmp_path / "key")
    d = daemon(make_daemon, golden, tmp_path, key_file=str(key))
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    ck = tmp_path / "ck" / "m1" / "images"
    tag = (ck / "manifest.mac").read_bytes()
    assert tag.startswith(b"hmac-sha256:") and stat.S_IMODE((ck / "manifest.mac").stat().st_mode) == 0o600
    original = (ck / "manifest.json").read_bytes()
    d.stop()
    # inspect-checkpoint checks the tag with the key it is given.
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(ck), "--key-file", str(key)], capture_output=True, text=True)
    assert r.returncode == 0 and "checkpoint " in r.stdout, r.stderr
    other = _key(tmp_path / "other-key")
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(ck), "--key-file", str(other)], capture_output=True, text=True)
    assert r.returncode == 1 and "another key" in r.stderr, r.stderr

    def refused_at_start(words):
        before = snapshot(ck)
        d.start()
        st = d.status()["models"]["m1"]
        assert st["state"] == "stopped" and words in st["last_error"], st
        assert metric(d, "llmuxd_restore_failures_total", model="m1", reason="unauthenticated") == 1
        assert complete(d, "m1", "c") == expected("m1", "c", 4)  # cold start
        assert d.status()["models"]["m1"]["last_wake_kind"] == "cold_start"
        d.stop()
        assert snapshot(ck) == before  # not ours for sure: left as it is

    m = json.loads(original)
    m["canary"] = "something else"
    (ck / "manifest.json").write_text(json.dumps(m))
    refused_at_start("does not match its manifest")
    (ck / "manifest.json").write_bytes(original)
    (ck / "manifest.mac").unlink()
    refused_at_start("no authentication tag")
    (ck / "manifest.mac").write_bytes(tag)
    key.write_bytes(secrets.token_hex(32).encode())  # another key
    refused_at_start("another key")
    # Without a key no tag is needed; with one, a checkpoint without a tag is refused (above).
    (ck / "manifest.mac").unlink()
    d.config["checkpoint"]["key_file"] = None
    d.start()
    assert d.status()["models"]["m1"]["state"] == "checkpointed"  # no key: no tag needed
    d.stop()
    # The right key and tag: restored.  Then an image is changed: the tag still matches the
    # manifest, whose digest of that image does not: refused before CRIU runs, quarantined.
    key = _key(tmp_path / "key2")
    d.config["checkpoint"]["key_file"] = str(key)
    d.start()
    complete(d, "m1")  # m1 had a checkpoint without a tag: refused, cold-started, now dumped with key2
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    d.stop()
    d.start()
    assert complete(d, "m1", "r") == expected("m1", "r", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"  # keep_images: reused
    img = max((ck / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(img, "r+b") as f:
        f.seek(img.stat().st_size // 2)
        f.write(b"\x01\x02\x03\x04")
    assert complete(d, "m1", "s") == expected("m1", "s", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and "corrupt" in st["last_error"], st
    assert not ck.exists() and list(ck.parent.glob("images.quarantine-*"))
    assert complete(d, "m2") == expected("m2", "hello", 4)


@pytest.mark.parametrize("bad", ["group_readable", "other_owner", "symlink"])
def test_a_key_file_others_could_read_or_replace_is_refused(make_daemon, golden, tmp_path, expected, bad):
    real = _key(tmp_path / "real-key")
    key = tmp_path / "key"
    if bad == "group_readable":
        _key(key, mode=0o640)
    elif bad == "other_owner":
        _key(key, owner=NOBODY)
    else:
        os.symlink(real, key)
    ck = plant(golden, tmp_path / "ck" / "m1" / "images")
    before = snapshot(tmp_path / "ck")
    d = daemon(make_daemon, golden, tmp_path, key_file=str(key))
    st = d.status()["models"]["m1"]
    assert st["state"] == "stopped" and str(key) in st["last_error"], st
    assert ("chmod 600" in st["last_error"]) or bad == "symlink", st["last_error"]
    # No checkpoint can be written with it either: the sleep escalates, nothing is replaced.
    assert complete(d, "m1", "k") == expected("m1", "k", 4)
    r = d.control("sleep", "m1").json()
    assert r["state"] == "stopped" and str(key) in r["last_error"], r
    assert snapshot(tmp_path / "ck") == before and (ck / "manifest.json").exists()


def test_doctor_reports_untrusted_checkpoint_folders_and_key_files(tmp_path):
    """`llmuxd doctor` applies the same rule to each model's folder and to the key file."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir(mode=0o700)
    good.mkdir(mode=0o700)
    os.chmod(bad, 0o777)
    key = tmp_path / "key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o644)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "models": {"a": {"model_path": "x/a", "port": 18001, "checkpoint_path": str(bad / "a")},
                   "b": {"model_path": "x/b", "port": 18002, "checkpoint_path": str(good / "b")}},
        "checkpoint": {"key_file": str(key)}}))
    out = subprocess.run([LLMUXD, "doctor", "--config", str(config)], capture_output=True, text=True).stdout
    def line(what: str) -> str:
        return next(ln.strip() for ln in out.splitlines() if what in ln)

    assert line("folder of a").startswith("WARN") and f"chmod go-w {bad}" in line("folder of a"), out
    assert line("folder of b").startswith("OK"), out
    assert line("key file").startswith("NO") and "group or others" in line("key file"), out
    os.chmod(key, 0o600)
    out = subprocess.run([LLMUXD, "doctor", "--config", str(config)], capture_output=True, text=True).stdout
    assert line("key file").startswith("OK"), out
