"""The models' own output: forwarded into llmuxd's log with the model's name, its files rotated
(copy-truncate, also under a tree that CRIU then dumps and restores), and its last lines in the
answer, the status and the log when a model cannot be started.  (The journal with MODEL= is
checked in the booted systemd container: tests/test_systemd.py.)"""

from __future__ import annotations

import os
import re

import httpx
import pytest

from conftest import model_entry
from harness import free_ports, wait_until
from llmuxd import modellog
from llmuxd.config import ConfigError, parse_config
from llmuxd.logfollow import Follower, Source

SECRET = "hf_" + "Q7dLm2Xv9KpZr4TnWb8Ys1"


def complete(d, model, prompt="hello", n=4) -> httpx.Response:
    return httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n},
                      timeout=120)


# -- a failed start says why ----------------------------------------------------------------------

def test_failed_start_shows_the_models_last_output(make_daemon):
    """A model whose server exits at start-up: the client's 503, /control/status and llmuxd's
    log carry the server's own last lines (its error among them), with the secret it was given
    redacted, and nothing from an earlier run of the tree."""
    p = free_ports(2)
    broken = {**model_entry("m1", p[0], extra=["--hf-token", SECRET]), "model_path": "test-org/not-in-the-cache"}
    d = make_daemon(models={"m1": broken, "m2": model_entry("m2", p[1])})
    log_file = d.workdir.parent / "logs" / "m1.log"
    log_file.parent.mkdir(exist_ok=True)
    log_file.write_text("an earlier run: not the cause\n")
    r = complete(d, "m1")
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    cause = "Cannot find model 'test-org/not-in-the-cache' in the offline HuggingFace cache"
    assert msg.startswith("model 'm1' could not be started: cold start failed: backend exited with code 1 "
                          f"during start-up; its last output ({log_file}):\n"), msg
    assert cause in msg and "Ignoring vLLM arguments" in msg, msg
    assert "an earlier run" not in msg and "--- llmuxd" not in msg
    assert "--hf-token <redacted>" in msg and SECRET not in msg
    st = d.status()["models"]["m1"]
    assert st["state"] == "stopped" and cause in st["last_error"] and SECRET not in st["last_error"]
    assert st["last_error"] in msg
    # llmuxd's log: the failure on one line, the output under it, indented (only a record's own
    # line starts at column 0); the model's lines themselves, forwarded with its name, too (by
    # the follower, at its next pass over the file).
    wait_until(lambda: any(line.startswith("[m1] ") and cause in line for line in d.log().splitlines()), 10,
               what="the model's own lines forwarded")
    log = d.log()
    lines = log.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(f"m1: cold start failed: backend exited with code 1 "
                                                                   f"during start-up; its last output ({log_file}):"))
    block = lines[at + 1:at + 1 + msg.count("\n")]
    assert any(cause in line for line in block) and all(line.startswith("    ") for line in block), block
    assert any(line.startswith("[m1] ") and cause in line for line in lines), log[-3000:]
    assert SECRET not in log
    assert complete(d, "m2").status_code == 200  # the others are served as before


# -- rotation ------------------------------------------------------------------------------------

def _append_fd(path) -> int:
    """A descriptor opened the way a tree's stdout is (O_WRONLY|O_APPEND)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def test_rotation_keeps_copies_bounds_the_file_and_forwards_every_line(tmp_path):
    path = tmp_path / "m1.log"
    writer = _append_fd(path)
    got: list[str] = []
    f = Follower([Source("m1", path, (SECRET,))], lambda name, line: got.append(line), max_bytes=4096, keep=2)
    f.poll()
    sent = []
    for i in range(400):  # ~16 KiB: rotated about four times, every line forwarded once, in order
        line = f"line {i:04d} " + "x" * 30 + (f" token={SECRET}" if i == 7 else "")
        os.write(writer, (line + "\n").encode())
        sent.append(line)
        if i % 25 == 0:
            f.poll()
            assert path.stat().st_size < 4096 + 26 * 50
    f.poll()
    os.write(writer, b"written after the last rotation\n")  # the writer's fd lands at the new end
    f.poll()
    os.close(writer)
    assert got[:7] == sent[:7] and got[8:400] == sent[8:] and got[400] == "written after the last rotation"
    assert got[7] == sent[7].replace(SECRET, "<redacted>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.log", "m1.log.1", "m1.log.2"]  # keep=2: no .3
    one, two = (tmp_path / "m1.log.1").read_text(), (tmp_path / "m1.log.2").read_text()
    assert int(two.splitlines()[-1].split()[1]) + 1 == int(one.splitlines()[0].split()[1])  # contiguous
    assert "\0" not in path.read_text() and path.read_text().endswith("written after the last rotation\n")
    assert (tmp_path / "m1.log.1").stat().st_mode & 0o777 == 0o600
    # The tail reads on into the newest copy when the file was just emptied.
    modellog.rotate(path, 2, path.stat().st_size)
    assert path.stat().st_size == 0
    assert modellog.tail(path, 3) == ["line 0398 " + "x" * 30, "line 0399 " + "x" * 30,
                                      "written after the last rotation"]


def test_a_rotation_in_the_way_is_said_once_and_retried(tmp_path, caplog):
    path = tmp_path / "m1.log"
    (tmp_path / "m1.log.1").write_text("older\n")
    (tmp_path / "m1.log.2").mkdir()  # .1 cannot move up
    (tmp_path / "m1.log.2" / "x").write_text("")
    got: list[str] = []
    f = Follower([Source("m1", path)], lambda name, line: got.append(line), max_bytes=4096, keep=2)
    f.poll()
    for i in range(3):
        with path.open("a") as fh:
            fh.write(f"{i} " + "y" * 5000 + "\n")
        f.poll()
    assert [line[:2] for line in got] == ["0 ", "1 ", "2 "]  # forwarded all the same
    warned = [r for r in caplog.records if "cannot rotate" in r.getMessage()]
    assert len(warned) == 1 and path.stat().st_size > 15000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.log", "m1.log.1", "m1.log.2"]  # no half copy
    (tmp_path / "m1.log.2" / "x").unlink()
    (tmp_path / "m1.log.2").rmdir()
    f.poll()
    assert path.stat().st_size == 0 and (tmp_path / "m1.log.2").read_text() == "older\n"
    assert (tmp_path / "m1.log.1").stat().st_size > 15000


def test_follower_never_follows_a_link_and_starts_at_the_end(tmp_path):
    secret = tmp_path / "not-a-log"
    secret.write_text("root's secret\n" * 10)
    (tmp_path / "m2.log").symlink_to(secret)
    old = tmp_path / "m1.log"
    old.write_text("before llmuxd started\n")
    got: list[tuple[str, str]] = []
    f = Follower([Source("m1", old), Source("m2", tmp_path / "m2.log")], lambda n, line: got.append((n, line)),
                 max_bytes=4096, keep=1)
    f.poll()
    assert got == []  # a file there at start is followed from its end: a restart repeats nothing
    with open(old, "a") as fh:
        fh.write("one\n\ntwo, no newline yet\x1b[2J")
    f.poll()
    assert got == [("m1", "one")]
    with open(old, "a") as fh:
        fh.write(" -- now\n")
    f.poll()
    assert got[-1] == ("m1", "two, no newline yet\\x1b[2J -- now")  # control characters escaped
    old.unlink()
    old.write_text("re-created (prepare-restore)\n")  # replaced: from its start
    f.poll()
    assert got[-1] == ("m1", "re-created (prepare-restore)")
    (tmp_path / "m2.log").unlink()
    (tmp_path / "m2.log").symlink_to(secret)
    secret.write_text("x" * 10000)
    f.poll()
    assert all(name == "m1" for name, _ in got) and secret.stat().st_size == 10000  # neither read nor rotated
    assert not (tmp_path / "m2.log.1").exists()


def test_tail_of_this_run_and_markers(tmp_path):
    path = tmp_path / "m1.log"
    path.write_text("old run\nold error\n")
    modellog.mark(path, "starting vllm serve x")
    with open(path, "a") as fh:
        fh.write("INFO loading\n\n(APIServer pid=7) ERROR boom\n")
    assert modellog.tail(path, 20, this_run=True) == ["INFO loading", "(APIServer pid=7) ERROR boom"]
    assert modellog.tail(path, 2) == ["INFO loading", "(APIServer pid=7) ERROR boom"]
    assert re.fullmatch(r"--- llmuxd: starting vllm serve x at [\d: -]+", modellog.tail(path, 3)[0])
    assert modellog.priority("(APIServer pid=7) ERROR boom") == 3 and modellog.priority("INFO: x") == 6
    assert modellog.priority("WARNING 01-02 x") == 4 and modellog.priority("Traceback (most") == 6
    modellog.mark(tmp_path / "absent.log", "restoring", create=False)
    assert not (tmp_path / "absent.log").exists()


def test_logs_settings_are_checked():
    cfg = parse_config({"models": {"m1": {"model_path": "a/b", "port": 8001}}})
    assert (cfg.logs.max_bytes, cfg.logs.keep) == (64 << 20, 3)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"m1": {"model_path": "a/b", "port": 8001}},
                      "logs": {"max_bytes": 100, "keep": -1, "kep": 2}})
    problems = "\n".join(e.value.problems)
    assert "logs.max_bytes: Input should be greater than or equal to 4096" in problems, problems
    assert "logs.keep:" in problems and "logs.kep: unknown key" in problems, problems


# -- forwarding and rotation under a daemon, across a CRIU dump and restore --------------------------

@pytest.mark.criu
def test_rotated_log_survives_checkpoint_and_restore(make_daemon, tmp_path, expected):
    """A tree's log rotated under it (its descriptor's offset then lies past the end of the
    file) is dumped and restored by CRIU; the restored tree appends at the file's new end, and
    llmuxd goes on forwarding its lines and rotating its file."""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])},
                    checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")},
                    logs={"max_bytes": 4096, "keep": 2})
    path = tmp_path / "logs" / "m1.log"
    i = 0
    while not (tmp_path / "logs" / "m1.log.1").exists():  # the access log grows the file
        assert complete(d, "m1", f"q{i}").status_code == 200
        i += 1
        assert i < 2000, "never rotated"
    wait_until(lambda: path.stat().st_size < 4096, 10, what="rotated")
    forwarded = len(re.findall(r"^\[m1\] .*POST /v1/completions", d.log(), re.M))
    assert forwarded >= i - 2, (forwarded, i)
    while path.stat().st_size < 1500:  # the tree's offset at the dump: well past what follows
        assert complete(d, "m1", f"p{i}").status_code == 200
        i += 1
    r = d.control("sleep", "m1")
    assert r.json()["state"] == "checkpointed", r.text
    dumped_size = path.stat().st_size
    assert 1500 <= dumped_size < 4096
    modellog.rotate(path, 2, dumped_size)  # rotated while checkpointed: the recorded offset lies past the end
    assert path.stat().st_size == 0
    assert complete(d, "m1", "after").json()["choices"][0]["text"] == expected("m1", "after", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "restore", st
    for j in range(3):
        assert complete(d, "m1", f"again {j}").status_code == 200
    data = path.read_bytes()
    assert b"\0" not in data and len(data) < dumped_size  # appended at the end, not at the restored offset
    assert b"--- llmuxd: restoring from" in data
    wait_until(lambda: len(re.findall(r"^\[m1\] .*POST /v1/completions", d.log(), re.M)) >= forwarded + 4, 10,
               what="the restored tree's lines forwarded")
    while not (tmp_path / "logs" / "m1.log.2").exists():  # and rotated again, under the restored tree
        assert complete(d, "m1", f"r{i}").status_code == 200
        i += 1
        assert i < 4000, "never rotated after the restore"
    assert complete(d, "m1", "last").status_code == 200
    assert b"\0" not in path.read_bytes() and path.stat().st_size < 4096 + 1024
