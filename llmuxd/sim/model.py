"""Fake models: HuggingFace-cache layout, resolution like vLLM, weights and deterministic output."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_GPU_BYTES = 600 * (1 << 20)
DEFAULT_WEIGHTS_BYTES = 1 << 20
EMBEDDING_DIM = 32
WEIGHT_SUFFIXES = (".safetensors", ".bin")

VOCAB = (
    "the of and to in is that it was for on are as with his they at be this from have or one had "
    "by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has "
    "look two more write go see number no way could people my than first water been call who oil "
    "its now find long down day did get come made may part"
).split()


class ModelNotFound(Exception):
    """MODEL is neither a local model folder nor a repo id in the offline HF cache."""


def hf_home() -> Path:
    """``$HF_HOME`` (default ``~/.cache/huggingface``)."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def hub_cache(home: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache folder: ``HF_HUB_CACHE``, else ``<HF_HOME>/hub``."""
    if home is not None:
        return Path(home) / "hub"
    env = os.environ.get("HF_HUB_CACHE")
    return Path(env) if env else hf_home() / "hub"


def _check_model_dir(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{what}: no config.json in {path}")
    if not weight_files(path):
        raise ModelNotFound(f"{what}: no weight files (*.safetensors, *.bin) in {path}")
    return path


def resolve(model: str) -> Path:
    """Resolve MODEL like vLLM with HF_HUB_OFFLINE=1: a local folder, or ORG/NAME in the hub cache."""
    local = Path(model).expanduser()
    if local.is_dir():
        return _check_model_dir(local.resolve(), f"local model {model!r}")
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise ModelNotFound(f"Invalid repository ID or local directory specified: {model!r}")
    repo = hub_cache() / ("models--" + model.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        raise ModelNotFound(
            f"Cannot find model {model!r} in the offline HuggingFace cache ({repo} has no refs/main)"
        ) from None
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        raise ModelNotFound(f"Snapshot {commit} of {model!r} is missing from {repo}")
    return _check_model_dir(snap, f"model {model!r}")


def weight_files(path: Path) -> list[Path]:
    """Weight files of a model folder, in load order."""
    return sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())


def read_config(path: Path) -> dict[str, Any]:
    """The model's config.json."""
    return json.loads((path / "config.json").read_text())


def gpu_footprint(path: Path, override: int | None = None) -> int:
    """Simulated GPU bytes: override, else config's ``sim_gpu_bytes``, else 600 MiB."""
    if override is not None:
        return override
    return int(read_config(path).get("sim_gpu_bytes", DEFAULT_GPU_BYTES))


def read_weights(path: Path) -> list[bytearray]:
    """Read every weight file fully into memory (then closed, as vLLM does after loading)."""
    out = []
    for f in weight_files(path):
        with open(f, "rb") as fh:
            out.append(bytearray(fh.read()))
    return out


def weights_digest(weights: list[bytearray]) -> bytes:
    """Digest of the in-memory weights: what the output depends on."""
    h = hashlib.sha256()
    for w in weights:
        h.update(len(w).to_bytes(8, "little"))
        h.update(w)
    return h.digest()


_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Approximate prompt token count (words and punctuation, at least 1)."""
    return max(1, len(_TOKEN_RE.findall(text)))


def _rng(digest: bytes, kind: str, text: str) -> random.Random:
    seed = hashlib.sha256(digest + kind.encode() + b"\0" + text.encode()).digest()
    return random.Random(int.from_bytes(seed, "big"))


def generate(digest: bytes, prompt: str, max_tokens: int) -> list[str]:
    """Deterministic completion tokens for a prompt under the given weights."""
    rng = _rng(digest, "generate", prompt)
    return [" " + rng.choice(VOCAB) for _ in range(max_tokens)]


def embed(digest: bytes, text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """Deterministic unit-norm embedding of a text under the given weights."""
    rng = _rng(digest, "embed", text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    return [x / norm for x in vec]


def render_chat(messages: list[dict[str, Any]]) -> str:
    """Render chat messages with a ChatML template (what the prompt text is for generation)."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content or ''}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


@dataclass
class MadeModel:
    """Where make_model put things."""

    repo_dir: Path
    snapshot: Path
    commit: str


def _write_blob(blobs: Path, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    blob = blobs / sha
    if not blob.exists():
        tmp = blobs / f".{sha}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, blob)
    return sha


def make_model(repo_id: str, seed: int, hf_home_dir: str | os.PathLike[str] | None = None, *,
               weights_bytes: int = DEFAULT_WEIGHTS_BYTES,
               gpu_bytes: int = DEFAULT_GPU_BYTES) -> MadeModel:
    """Write a tiny fake model into ``<HF_HOME>/hub/models--ORG--NAME`` (HF cache layout)."""
    if repo_id.count("/") != 1:
        raise ValueError(f"repo id must be ORG/NAME, got {repo_id!r}")
    repo = hub_cache(hf_home_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    weights = random.Random(seed).randbytes(weights_bytes)
    config = json.dumps({
        "architectures": ["SimForCausalLM"],
        "model_type": "llmuxd-sim",
        "sim_seed": seed,
        "sim_gpu_bytes": gpu_bytes,
        "max_position_embeddings": 2048,
    }, indent=2).encode()
    files = {"config.json": _write_blob(blobs, config),
             "model.safetensors": _write_blob(blobs, weights)}
    snap, commit = link_snapshot(repo, files)
    return MadeModel(repo_dir=repo, snapshot=snap, commit=commit)


def link_snapshot(repo: Path, files: dict[str, str]) -> tuple[Path, str]:
    """Lay out ``snapshots/<commit>/<name> -> ../../blobs/<sha256>`` and ``refs/main`` for blobs
    already in ``repo/blobs`` (HF cache layout); returns the snapshot folder and the commit."""
    commit = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, sha in files.items():
        link = snap / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", "..", "blobs", sha))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap, commit
