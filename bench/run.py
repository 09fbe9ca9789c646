"""The benchmark: every figure llmuxd's performance targets are judged by, in one run.

Sections (each a program of its own in bench/, run in turn as a child process, side by side on
one machine so that the ratios are comparable; figures, never pass/fail tests):

* ``sim``     checkpoint/restore through llmuxd on the vLLM simulator (bench/checkpoint.py);
* ``vllm``    the same on real vLLM's CPU build (``scripts/setup-vllm.sh`` first; skipped, with
              the reason, when it is not there);
* ``proxy``   the OpenAI proxy against a backend called directly (bench/proxy.py; wants 4+ CPUs
              to keep llmuxd, the backend and the load apart);
* ``hashing`` what the checkpoint's digests and saved-file copies cost (bench/hashing.py);
* ``gpu``     the GPU run (tests/gpu/drive.py: llmuxd on a GPU with the torch test backend,
              checkpoint, restore in a new container, CUDA suspend), on a machine with a GPU.

  .venv/bin/python bench/run.py                    # sim, vllm, proxy, hashing
  .venv/bin/python bench/run.py sim proxy          # some sections
  python3 bench/run.py --gpu --label h200 ...      # the GPU machine's run (tests/gpu/run.sh)
  .venv/bin/python bench/run.py --readme           # only rewrite README's table from bench/results

Prints each target with the measured figure, writes ``bench/results/<section>-<label>.json`` (every
figure) and ``bench/results/summary-<label>.{json,md}``; ``--readme`` regenerates README's
performance table from every summary in bench/results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"  # --results moves it (the GPU run writes beside its logs)
README_BEGIN = "<!-- bench:begin (bench/run.py --readme writes this table) -->"
README_END = "<!-- bench:end -->"


@dataclass
class Target:
    section: str
    what: str
    measured: float | None  # None: not measured in this run
    limit: float | None  # None: a figure shown beside the targets, with none of its own
    unit: str = "×"
    lower_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.limit is None:
            return None
        return self.measured <= self.limit if self.lower_is_better else self.measured >= self.limit

    def row(self) -> str:
        fmt = (lambda v: f"{v:.2f}{self.unit}") if self.unit == "×" else (lambda v: f"{v:.3g} {self.unit}")
        want = "—" if self.limit is None else ("≤ " if self.lower_is_better else "≥ ") + fmt(self.limit)
        got = "—" if self.measured is None else fmt(self.measured)
        mark = {True: "met", False: "NOT met", None: "not measured" if self.measured is None else ""}[self.met]
        return f"| {self.section} | {self.what} | {want} | {got} | {mark} |"


# -- the sections: each runs one program and turns its figures into targets ----------------------------


def _run(cmd: list, log: Path, env: dict | None = None) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        for line in p.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            f.write(line)
        if p.wait():
            raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} failed (exit status {p.returncode}); see {log}")


def checkpoint(section: str, args, work: Path) -> tuple[dict, list[Target]]:
    out = work / f"{section}.json"
    cmd = [sys.executable, HERE / "checkpoint.py", "--rounds", str(args.rounds or (5 if section == "sim" else 2)),
           "--json", out]
    if section == "vllm":
        venv = Path(os.environ.get("LLMUXD_VLLM_VENV", "/opt/llmuxd/vllm-venv"))
        if not (venv / "bin" / "vllm").exists():
            raise Skipped(f"no vLLM CPU build at {venv} (scripts/setup-vllm.sh installs it)")
        cmd.append("--vllm")
    _run(cmd, work / f"{section}.log")
    doc = json.loads(out.read_text())
    r, med = doc["ratios"], doc["median"]
    # The targets are real vLLM's; the simulator "loads" in a fraction of a second, so its ratios
    # are figures beside them (what llmuxd's own steps cost on a tree with little to load).
    limit = (lambda v: v) if section == "vllm" else (lambda v: None)
    targets = [Target(section, "cold start → first token", med["cold"], None, "s"),
               Target(section, "restore → first token", med["restore_ftt"], None, "s"),
               Target(section, "llmuxd sleep (discard + checkpoint) ÷ its bare `criu dump`", r["dump_vs_criu"],
                      limit(1.10)),
               Target(section, "llmuxd restore ÷ its bare `criu restore`", r["restore_vs_criu"], limit(1.10)),
               Target(section, "switch checkpointed → checkpointed, first token ÷ a restore's first token",
                      r["switch_vs_restore"], limit(1.10)),
               Target(section, "restore → first token ÷ cold start → first token", r["restore_vs_cold"], limit(0.05))]
    return doc, targets


def proxy(section: str, args, work: Path) -> tuple[dict, list[Target]]:
    if (os.cpu_count() or 1) < 4:
        raise Skipped(f"{os.cpu_count()} CPUs: the proxy benchmark needs 4+ to keep llmuxd, the backend and the load apart")
    cmd = [sys.executable, HERE / "proxy.py", "--out", work, "--host-label", args.label]
    if args.quick:
        cmd += ["--scale", "0.5"]
    _run(cmd, work / "proxy.log")
    doc = json.loads((work / f"proxy-{args.label}.json").read_text())
    d = next(iter(doc["derived"].values()))
    targets = [Target(section, "throughput at concurrency 32 ÷ an aiohttp backend called directly",
                      d["aiohttp"]["c32_ratio"], 0.8, lower_is_better=False),
               Target(section, "throughput at concurrency 32 ÷ a raw asyncio backend called directly",
                      d["raw"]["c32_ratio"], 0.4, lower_is_better=False),
               Target(section, "latency added at p50 (aiohttp backend)", d["aiohttp"]["added_p50_ms"], 0.3, "ms"),
               Target(section, "SSE first event added (aiohttp backend)", d["aiohttp"]["sse_first_added_ms"], 0.3,
                      "ms"),
               Target(section, "1,000 SSE streams: largest steady gap added", max(
                   d[b]["sse_many_steady_gap_added_ms"] for b in d), 10.0, "ms")]
    return doc, targets


def hashing(section: str, args, work: Path) -> tuple[dict, list[Target]]:
    _run([sys.executable, HERE / "hashing.py"], work / "hashing.log")
    return {"output": (work / "hashing.log").read_text()}, []


def gpu(section: str, args, work: Path) -> tuple[dict, list[Target]]:
    drive = Path(args.drive) if args.drive else REPO / "tests" / "gpu" / "drive.py"
    # drive.py writes its report (gpu-h200.{json,md}) and llmuxd's logs beside the results
    cmd = [sys.executable, drive, "--out", RESULTS] + (["--criu", args.criu] if args.criu else [])
    _run(cmd, RESULTS / "drive.log")
    doc = json.loads((RESULTS / "gpu-h200.json").read_text())
    steps = doc["steps"]
    sleep, restore = steps["sleep_checkpoint"], steps["restore"]
    bare_dump = sleep["phases"]["cuda_suspend"] + sleep["phases"]["criu_dump"]
    bare_restore = sum(restore["phases"][p] for p in ("criu_restore", "cuda_resume", "wake_sequence"))
    return doc, [
        Target(section, "restore in a new container → first token", restore["first_token_secs"], 1.0, "s"),
        Target(section, "llmuxd sleep (discard + checkpoint) ÷ its CUDA suspend + `criu dump`",
               sleep["transition_secs"] / bare_dump, 1.10),
        Target(section, "llmuxd restore ÷ its `criu restore` + CUDA resume + wake sequence",
               restore["transition_secs"] / bare_restore, 1.10)]


class Skipped(Exception):
    pass


SECTIONS = {"sim": checkpoint, "vllm": checkpoint, "proxy": proxy, "hashing": hashing, "gpu": gpu}
DEFAULT = ["sim", "vllm", "proxy", "hashing"]


# -- the summary and README's table ---------------------------------------------------------------------


def summary_md(label: str, info: dict, targets: list[Target], skipped: dict[str, str]) -> str:
    lines = [f"# llmuxd benchmark: {label}", "",
             f"Run {info['date']} on {info['machine']}; sections: {', '.join(info['sections'])}.", "",
             "| section | figure | target | measured | |", "|---|---|---|---|---|"]
    lines += [t.row() for t in targets]
    lines += [f"| {s} | skipped: {why} | | | |" for s, why in skipped.items()]
    return "\n".join(lines) + "\n"


def rewrite_readme() -> None:
    rows = []
    for path in sorted(RESULTS.glob("summary-*.json")):
        doc = json.loads(path.read_text())
        for t in doc["targets"]:
            t = Target(**t)
            rows.append(t.row().replace(f"| {t.section} |", f"| {doc['label']}: {t.section} |", 1))
    table = "\n".join(["| machine: section | figure | target | measured | |", "|---|---|---|---|---|", *rows])
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(f"README.md: table rewritten from {len(rows)} figures")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sections", nargs="*", help=f"of {', '.join(SECTIONS)} (default: {' '.join(DEFAULT)})")
    ap.add_argument("--gpu", action="store_true", help="the GPU machine's run: sections gpu and proxy")
    ap.add_argument("--label", default=f"{os.cpu_count()}cpu", help="names the results (default: <CPUs>cpu)")
    ap.add_argument("--rounds", type=int, help="checkpoint rounds (default 5 on the simulator, 2 on vLLM)")
    ap.add_argument("--quick", action="store_true", help="shorter proxy measurements")
    ap.add_argument("--drive", help="the GPU run's driver (default tests/gpu/drive.py)")
    ap.add_argument("--criu", help="the criu the GPU run uses")
    ap.add_argument("--readme", action="store_true", help="only rewrite README's table from bench/results")
    ap.add_argument("--results", type=Path, help="where results go (default bench/results)")
    args = ap.parse_args()
    global RESULTS
    if args.results:
        RESULTS = args.results.resolve()
    if args.readme:
        rewrite_readme()
        return 0
    sections = args.sections or (["gpu", "proxy"] if args.gpu else DEFAULT)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmuxd-bench-"))
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    failed = False
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "sections": sections}
    for section in sections:
        print(f"\n== {section} ==", flush=True)
        try:
            doc, got = SECTIONS[section](section, args, work)
        except Skipped as e:
            skipped[section] = str(e)
            print(f"skipped: {e}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 — one section failing does not lose the others' figures
            skipped[section] = f"failed: {e}"
            print(f"FAILED: {e}", file=sys.stderr, flush=True)
            failed = True
            continue
        (RESULTS / f"{section}-{args.label}.json").write_text(json.dumps(doc, indent=1) + "\n")
        targets += got
    md = summary_md(args.label, info, targets, skipped)
    (RESULTS / f"summary-{args.label}.md").write_text(md)
    (RESULTS / f"summary-{args.label}.json").write_text(json.dumps(
        {"label": args.label, **info, "targets": [asdict(t) for t in targets], "skipped": skipped}, indent=1) + "\n")
    print("\n" + md)
    print(f"written: {RESULTS}/summary-{args.label}.{{md,json}}")
    if failed:
        print(f"work folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
