"""``llmuxd validate MODEL --policies ...``: sleep/wake cycles of one model under each given
eviction policy, with timings, memory before/after and a response-match check, as a table
(llmux's --validate).  Runs the daemon's own Model state machine, without a daemon."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .. import cuda as cudamod
from ..config import Config, Eviction, ProcessEviction, WeightsEviction
from ..isolation.reaper import reap_forever
from . import CommandError
from .standalone import standalone_model, tidy

DEFAULT_POLICIES = "offload+keep_running,discard+keep_running,retain+cuda_suspend,discard+checkpoint,retain+stop"


def parse_policy(text: str) -> Eviction:
    try:
        weights, process = text.split("+")
        return Eviction(weights=WeightsEviction(weights), process=ProcessEviction(process))
    except ValueError:
        raise CommandError(f"bad policy {text!r}: use WEIGHTS+PROCESS, e.g. discard+checkpoint") from None


def memory(pids: list[int]) -> tuple[int, int]:
    """(host RSS, GPU bytes) of a process tree."""
    rss = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    gpu = cudamod.gpu_bytes_of(pids) if cudamod.gpu_processes(pids) else {}
    return rss, sum(gpu.values())


@dataclass
class Row:
    policy: str
    cycles: list[dict] = field(default_factory=list)
    error: str | None = None


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}M"


async def validate(config: Config, name: str, policies: list[str], cycles: int) -> list[Row]:
    rows = []
    reaper = asyncio.create_task(reap_forever())
    try:
        for text in policies:
            ev = parse_policy(text)
            m = config.models[name].model_copy(update={"eviction": ev})
            cfg = config.model_copy(update={"models": {**config.models, name: m}})
            model = standalone_model(cfg, name, force_checkpoint=False)
            row = Row(str(ev))
            rows.append(row)
            try:
                await model.wake()
                reference = await model.backend.canary()
                for _ in range(cycles):
                    before = memory(model.backend.pids())
                    t = time.monotonic()
                    await model.sleep()
                    slept = time.monotonic() - t
                    asleep_state = model.state.value
                    asleep = memory(model.backend.pids())
                    t = time.monotonic()
                    await model.wake()
                    woke = time.monotonic() - t
                    answer = await model.backend.canary()
                    row.cycles.append({"sleep_s": slept, "state": asleep_state, "wake_s": woke,
                                       "wake_kind": model.last_wake_kind, "before": before, "asleep": asleep,
                                       "after": memory(model.backend.pids()), "match": answer == reference,
                                       "error": model.last_error})
            except Exception as e:  # noqa: BLE001 - one policy failing is a row, not the end
                row.error = str(e)
            finally:
                await model.stop()
                await model.close()
                tidy(model)
                if ev.process is ProcessEviction.CHECKPOINT:
                    model.checkpointer.discard()
    finally:
        reaper.cancel()
    return rows


def print_table(name: str, rows: list[Row]) -> bool:
    head = ("POLICY", "CYCLE", "SLEEP", "ASLEEP AS", "WAKE", "WAKE KIND", "RSS BEFORE/ASLEEP/AFTER",
            "GPU BEFORE/ASLEEP/AFTER", "MATCH")
    out, ok = [head], True
    for row in rows:
        if row.error:
            out.append((row.policy, "-", "-", "-", "-", "-", "-", "-", f"ERROR: {row.error}"))
            ok = False
        for i, c in enumerate(row.cycles, 1):
            ok &= c["match"]
            out.append((row.policy, str(i), f"{c['sleep_s']:.3f}s", c["state"], f"{c['wake_s']:.3f}s", c["wake_kind"],
                        "/".join(_mib(x[0]) for x in (c["before"], c["asleep"], c["after"])),
                        "/".join(_mib(x[1]) for x in (c["before"], c["asleep"], c["after"])),
                        "yes" if c["match"] else "NO"))
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    print(f"llmuxd validate {name}")
    for r in out:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("all responses matched" if ok else "SOME POLICIES FAILED OR ANSWERED DIFFERENTLY")
    return ok
