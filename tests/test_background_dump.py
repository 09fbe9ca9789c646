"""A switch away from a checkpoint model waits for the GPU, not for the dump: the dump finishes
in the background (state ``dumping``) while the next model serves, and nothing is lost when it
fails, when the model is wanted back before it ends, or when llmuxd stops meanwhile.

CRIU is real; its ``dump`` is held back by a wrapper script until the test lets it go (a file),
so each window is reached for certain, not by timing."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import model_entry
from harness import free_ports, wait_until
from llmuxd.isolation import procfs
from test_checkpoint_faults import CRIU, ck, ckdir, complete, wrapper  # noqa: F401 - ck is a fixture
from test_switching import metric

pytestmark = [pytest.mark.criu]


def held_dump(tmp_path, extra: str = "") -> str:
    """A criu whose dump waits for ``tmp_path/go`` (at most 60 s), then runs ``extra``."""
    return wrapper(tmp_path, f'if [ "$1" = dump ]; then i=0; while [ ! -e {tmp_path}/go ] && [ $i -lt 600 ]; '
                             f'do sleep 0.1; i=$((i+1)); done; {extra or ":"}; fi')


def state(d, model="m1") -> dict:
    return d.status()["models"][model]


def test_switch_serves_the_next_model_while_the_dump_goes_on(ck, tmp_path, expected):
    d = ck(criu=held_dump(tmp_path))
    assert complete(d, "m1", "a").json()["choices"][0]["text"] == expected("m1", "a", 4)
    r = complete(d, "m2", "b")  # evicts m1: returns with m1's dump still held back
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("m2", "b", 4)
    st = state(d)
    assert st["state"] == "dumping" and st["pids"] and st["last_checkpoint"] is None, st
    assert not ckdir(d).exists()
    (tmp_path / "go").touch()
    wait_until(lambda: state(d)["state"] == "checkpointed", 60, what="m1's background dump")
    st = state(d)
    assert st["pids"] == [] and st["last_checkpoint"]["image_bytes"] > 0 and st["escalations"] == 0, st
    assert (ckdir(d) / "manifest.json").exists() and not list(ckdir(d).parent.glob("images.partial-*"))
    assert "background dump ended" in d.log()
    assert metric(d, "llmuxd_switch_phase_seconds_count", phase="dump") == 1
    assert complete(d, "m1", "c").json()["choices"][0]["text"] == expected("m1", "c", 4)
    assert state(d)["last_wake_kind"] == "restore"


def test_a_dumping_model_wanted_back_waits_for_its_dump_then_restores(ck, tmp_path, expected):
    d = ck(criu=held_dump(tmp_path))
    assert complete(d, "m1").status_code == 200
    assert complete(d, "m2").status_code == 200
    assert state(d)["state"] == "dumping"
    answer: list = []
    t = threading.Thread(target=lambda: answer.append(complete(d, "m1", "back")))
    t.start()
    t.join(2)
    assert t.is_alive() and state(d)["state"] == "dumping"  # the request waits for the dump
    (tmp_path / "go").touch()
    t.join(120)
    assert answer and answer[0].status_code == 200, answer
    assert answer[0].json()["choices"][0]["text"] == expected("m1", "back", 4)
    st = state(d)
    assert st["state"] == "awake" and st["last_wake_kind"] == "restore" and st["escalations"] == 0, st
    assert state(d, "m2")["state"] != "awake"


def test_a_background_dump_that_fails_escalates_and_loses_nothing(ck, tmp_path, expected):
    d = ck(criu=held_dump(tmp_path, 'echo "Error: injected" >&2; exit 1'))
    assert complete(d, "m1").status_code == 200
    pids = state(d)["pids"]
    assert complete(d, "m2", "x").status_code == 200
    (tmp_path / "go").touch()
    wait_until(lambda: state(d)["state"] == "stopped", 60, what="m1's failed dump to escalate")
    st = state(d)
    assert st["escalations"] == 1 and "escalated to stop" in st["last_error"], st
    assert metric(d, "llmuxd_eviction_escalations_total", model="m1") == 1
    wait_until(lambda: not any(procfs.alive(p) for p in pids), 15, what="m1's tree gone")
    assert not ckdir(d).exists() and not list(ckdir(d).parent.glob("images.partial-*"))  # no half checkpoint
    assert complete(d, "m2", "y").json()["choices"][0]["text"] == expected("m2", "y", 4)  # m2 unharmed
    assert complete(d, "m1", "z").json()["choices"][0]["text"] == expected("m1", "z", 4)  # a cold start
    assert state(d)["last_wake_kind"] == "cold_start"


def test_stopping_llmuxd_during_a_background_dump_keeps_the_checkpoint(ck, tmp_path, expected):
    d = ck(criu=held_dump(tmp_path))
    assert complete(d, "m1").status_code == 200
    assert complete(d, "m2").status_code == 200
    assert state(d)["state"] == "dumping"
    rc: list = []
    t = threading.Thread(target=lambda: rc.append(d.stop()))
    t.start()
    t.join(2)
    assert t.is_alive()  # llmuxd waits for the dump before it exits
    (tmp_path / "go").touch()
    t.join(120)
    assert rc == [0] and d.leftovers == []
    d.start()
    assert state(d)["state"] == "checkpointed"
    assert complete(d, "m1", "q").json()["choices"][0]["text"] == expected("m1", "q", 4)
    assert state(d)["last_wake_kind"] == "restore"


def test_switches_between_two_checkpoint_models_dump_and_restore_side_by_side(make_daemon, tmp_path, expected):
    """Two checkpointed trees alike (the same program): CRIU names its link remaps in the shared
    /dev/shm ``link_remap.N`` with N counted per dump, so the dump of one and the restore of the
    other need the same names.  The switch's restore goes first and the dump follows it; not one
    eviction escalates, every wake after the first of each is a restore."""
    p = free_ports(2)
    d = make_daemon(models={m: model_entry(m, port, "discard", "checkpoint") for m, port in zip(("m1", "m2"), p)},
                    checkpoint={"criu_path": CRIU, "images_dir": str(tmp_path / "ck")})
    remaps = set()
    for i, model in enumerate(["m1", "m2", "m1", "m2", "m1", "m2"]):
        r = complete(d, model, f"p{i}")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(model, f"p{i}", 4), r.text
        st = d.status()["models"]
        assert st[model]["last_wake_kind"] == ("cold_start" if i < 2 else "restore"), st[model]
        other = "m2" if model == "m1" else "m1"
        if i:  # the model left behind is dumped once this one woke
            wait_until(lambda: state(d, other)["state"] != "dumping", 60, what=f"{other}'s dump")
            assert state(d, other)["state"] == "checkpointed", state(d, other)
            manifest = json.loads((tmp_path / "ck" / other / "images" / "manifest.json").read_text())
            remaps |= {f["path"] for f in manifest["link_remaps"]}
        for m, s in d.status()["models"].items():
            assert s["escalations"] == 0 and s["restore_failures"] == 0, (m, s)
    assert remaps, "the trees had no link remaps: this test would not see the race it is about"
