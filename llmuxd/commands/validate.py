"""``llmuxd validate MODEL --policies ...``: sleep/wake cycles of one model under each given
eviction policy, with timings, memory before/after and a response-match check, as a table
(llmux's --validate).  Runs the daemon's own Model state machine, without a daemon."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, computed_field

from .. import cuda as cudamod
from ..config import Config, Eviction, ProcessEviction, WeightsEviction
from ..isolation.reaper import reap_forever
from ..errors import BadRequest
from .standalone import known_model, standalone_model, tidy

DEFAULT_POLICIES = "offload+keep_running,discard+keep_running,retain+cuda_suspend,discard+checkpoint,retain+stop"


def parse_policy(text: str) -> Eviction:
    try:
        weights, process = text.split("+")
        return Eviction(weights=WeightsEviction(weights), process=ProcessEviction(process))
    except ValueError:
        raise BadRequest(f"bad policy {text!r}: use WEIGHTS+PROCESS, e.g. discard+checkpoint",
                         param="policies") from None


class Memory(BaseModel):
    rss_bytes: int  # host memory of the tree
    gpu_bytes: int


def memory(pids: list[int]) -> Memory:
    """Host RSS and GPU bytes of a process tree."""
    rss = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    gpu = cudamod.gpu_bytes_of(pids) if cudamod.gpu_processes(pids) else {}
    return Memory(rss_bytes=rss, gpu_bytes=sum(gpu.values()))


class Cycle(BaseModel):
    """One sleep and wake of the model."""

    sleep_secs: float
    state: str  # the model's state while asleep
    wake_secs: float
    wake_kind: str | None
    before: Memory
    asleep: Memory
    after: Memory
    match: bool  # the answer after the wake equals the one before the first sleep
    error: str | None  # the model's last error


class PolicyRun(BaseModel):
    policy: str
    cycles: list[Cycle] = []
    error: str | None = None  # the policy could not be run through


class ValidateReport(BaseModel):
    """What ``llmuxd validate`` found (``--json`` prints it)."""

    model: str
    runs: list[PolicyRun]

    @computed_field
    @property
    def ok(self) -> bool:
        """Every policy ran through and every answer matched."""
        return all(r.error is None and all(c.match for c in r.cycles) for r in self.runs)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}M"


async def validate(config: Config, name: str, policies: list[str], cycles: int) -> ValidateReport:
    known_model(config, name)
    evictions = [parse_policy(text) for text in policies]
    report = ValidateReport(model=name, runs=[])
    reaper = asyncio.create_task(reap_forever())
    try:
        for ev in evictions:
            m = config.models[name].model_copy(update={"eviction": ev})
            cfg = config.model_copy(update={"models": {**config.models, name: m}})
            model = standalone_model(cfg, name, force_checkpoint=False)
            run = PolicyRun(policy=str(ev))
            report.runs.append(run)
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
                    run.cycles.append(Cycle(sleep_secs=slept, state=asleep_state, wake_secs=woke,
                                            wake_kind=model.last_wake_kind, before=before, asleep=asleep,
                                            after=memory(model.backend.pids()), match=answer == reference,
                                            error=model.last_error))
            except Exception as e:  # noqa: BLE001 - one policy failing is a row, not the end
                run.error = str(e)
            finally:
                await model.stop()
                await model.close()
                tidy(model)
                if ev.process is ProcessEviction.CHECKPOINT:
                    model.checkpointer.discard()
    finally:
        reaper.cancel()
    return report


def render(report: ValidateReport) -> str:
    head = ("POLICY", "CYCLE", "SLEEP", "ASLEEP AS", "WAKE", "WAKE KIND", "RSS BEFORE/ASLEEP/AFTER",
            "GPU BEFORE/ASLEEP/AFTER", "MATCH")
    out = [head]
    for run in report.runs:
        if run.error:
            out.append((run.policy, "-", "-", "-", "-", "-", "-", "-", f"ERROR: {run.error}"))
        for i, c in enumerate(run.cycles, 1):
            mems = (c.before, c.asleep, c.after)
            out.append((run.policy, str(i), f"{c.sleep_secs:.3f}s", c.state, f"{c.wake_secs:.3f}s",
                        c.wake_kind or "-", "/".join(_mib(x.rss_bytes) for x in mems),
                        "/".join(_mib(x.gpu_bytes) for x in mems), "yes" if c.match else "NO"))
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    return "\n".join([f"llmuxd validate {report.model}",
                      *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in out),
                      "all responses matched" if report.ok else "SOME POLICIES FAILED OR ANSWERED DIFFERENTLY"])
