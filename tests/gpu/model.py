"""A small real language model for GPU tests: weights in a safetensors file in a HuggingFace
cache, a KV buffer, greedy decoding (optionally through one captured CUDA graph).

Architecture (deterministic from the weights, nothing trained): token embedding ``embed``
[vocab, hidden], output head ``lm_head`` [vocab, hidden]; ``layers`` blocks of RMSNorm -> single-head attention over
the KV buffer -> RMSNorm -> GELU MLP (4x); a final RMSNorm.  One decode step takes a token id
and a position, writes K and V at that position, attends over positions <= pos, and returns the
argmax next token.  Every step has fixed shapes (the attention spans the whole context window
with a mask), so one CUDA graph replays every step of every request.

The KV buffer ``[2, layers, kv_tokens, hidden]`` is sized by ``kv_cache_bytes`` in config.json
(like vLLM's preallocated KV cache); attention uses its first ``max_position_embeddings`` slots.

Tokenizer: words and punctuation (the simulator's regex), each mapped by CRC-32 to an id in
[1, vocab); id 0 is BOS.  Output ids are spelled as made-up words of syllables.

The safetensors file is written and read here without the ``safetensors`` package (the format:
u64 little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` padded
to 8 bytes, then the raw tensors), and without numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmuxd.sim.model import link_snapshot

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ARCH = "LlmuxdGpuTestLM"

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_CONS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONS for v in _VOWELS]


# -- tokenizer ----------------------------------------------------------------------------------
def encode(text: str, vocab: int) -> list[int]:
    """BOS + one id per word or punctuation mark."""
    return [0] + [1 + zlib.crc32(w.lower().encode()) % (vocab - 1) for w in _TOKEN_RE.findall(text)]


def decode_token(tid: int) -> str:
    """A made-up word for a token id (with a leading space, like a BPE word token)."""
    n, parts = int(tid), []
    while True:
        n, r = divmod(n, len(_SYLLABLES))
        parts.append(_SYLLABLES[r])
        if n == 0:
            break
    return " " + "".join(reversed(parts))


# -- config and weights layout ------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    vocab: int
    window: int  # max_position_embeddings: the attention span
    kv_tokens: int  # slots in the KV buffer (>= window)
    dtype: torch.dtype

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Dims":
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            cfg.get("torch_dtype", "bfloat16")]
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        window = int(cfg["max_position_embeddings"])
        per_token = 2 * layers * hidden * torch.finfo(dtype).bits // 8
        kv_tokens = max(window, int(cfg.get("kv_cache_bytes", 0)) // per_token)
        return cls(hidden, layers, int(cfg["vocab_size"]), window, kv_tokens, dtype)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.layers * self.kv_tokens * self.hidden * torch.finfo(self.dtype).bits // 8


def weight_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight, in file order."""
    h, f = d.hidden, 4 * d.hidden
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (d.vocab, h)}
    for i in range(d.layers):
        p = f"layers.{i}."
        shapes |= {p + "norm1.weight": (h,), p + "wqkv.weight": (3 * h, h), p + "wo.weight": (h, h),
                   p + "norm2.weight": (h,), p + "up.weight": (f, h), p + "down.weight": (h, f)}
    shapes["norm.weight"] = (h,)
    shapes["lm_head.weight"] = (d.vocab, h)
    return shapes


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.finfo(dtype).bits // 8


# -- safetensors --------------------------------------------------------------------------------
def _header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, meta: dict[str, str]) -> tuple[bytes, dict]:
    entries: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for name, shape in shapes.items():
        n = _nbytes(shape, dtype)
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, entries


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header entries) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def write_weights(path: Path, d: Dims, seed: int, device: str = "cpu") -> None:
    """Random weights (deterministic from ``seed`` on a given device type) into a safetensors file,
    through a shared file mapping (no numpy needed)."""
    shapes = weight_shapes(d)
    head, entries = _header(shapes, d.dtype, {"format": "pt", "seed": str(seed)})
    total = len(head) + sum(_nbytes(s, d.dtype) for s in shapes.values())
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(total)
    storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=total)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            t = torch.ones(shape, device=device)
        else:
            std = 1.0 if name == "embed.weight" else 1.0 / math.sqrt(shape[1])
            t = torch.randn(shape, generator=gen, device=device) * std
        a, b = entries[name]["data_offsets"]
        whole[len(head) + a:len(head) + b].view(d.dtype).view(shape).copy_(t.to(d.dtype).cpu())
    del whole, storage  # unmapped: the bytes are in the file


def load_into(path: Path, tensors: dict[str, torch.Tensor], chunk: int = 256 << 20) -> int:
    """Read the safetensors file into existing tensors (any device), in place; returns bytes read.
    The file is read with plain reads and closed (no mapping is left, as vLLM does).  For GPU
    tensors the reads go through one pinned staging buffer (released afterwards) when numpy is
    there to expose it; otherwise through a plain bytearray."""
    start, entries = read_header(path)
    total = 0
    chunk = max(1, min(chunk, os.path.getsize(path) - start))
    staging, buf = None, None
    if any(t.is_cuda for t in tensors.values()):
        try:
            import numpy  # noqa: F401  (Tensor.numpy() needs it)

            staging = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
            buf = memoryview(staging.numpy())
        except ImportError:
            staging = None
    if staging is None:
        buf = memoryview(bytearray(chunk))
        src = torch.frombuffer(buf, dtype=torch.uint8)
    else:
        src = staging
    try:
        with open(path, "rb") as f:
            for name, dst in tensors.items():
                e = entries[name]
                if DTYPES[e["dtype"]] != dst.dtype or tuple(e["shape"]) != tuple(dst.shape):
                    raise ValueError(f"{name}: file has {e['dtype']}{e['shape']}, model wants {dst.dtype}{list(dst.shape)}")
                a, b = e["data_offsets"]
                flat = dst.view(-1).view(torch.uint8)
                f.seek(start + a)
                pos = 0
                while pos < b - a:
                    n = f.readinto(buf[:min(chunk, b - a - pos)])
                    if not n:
                        raise ValueError(f"{path}: truncated at {name}")
                    flat[pos:pos + n].copy_(src[:n])  # synchronous: the buffer is reused next
                    pos += n
                total += b - a
    finally:
        del src, staging, buf
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # give the pinned pages back: they would be dumped
    return total


# -- HuggingFace cache ----------------------------------------------------------------------------
@dataclass
class Made:
    snapshot: Path
    weights_bytes: int
    kv_bytes: int


def make_model(repo_id: str, hf_home: Path, *, hidden: int, layers: int, vocab: int, window: int,
               kv_bytes: int, seed: int, dtype: str = "bfloat16", device: str = "cpu") -> Made:
    """Write config.json and model.safetensors into ``<hf_home>/hub/models--ORG--NAME`` (blobs,
    snapshots/<commit>/ symlinks, refs/main), like huggingface_hub does."""
    cfg = {"architectures": [ARCH], "model_type": "llmuxd-gpu-test", "hidden_size": hidden,
           "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": window,
           "kv_cache_bytes": kv_bytes, "torch_dtype": dtype, "seed": seed}
    d = Dims.from_config(cfg)
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".incoming-{os.getpid()}"
    write_weights(tmp, d, seed, device)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(64 << 20):
            h.update(block)
    files = {"model.safetensors": h.hexdigest()}
    os.replace(tmp, blobs / files["model.safetensors"])
    raw = json.dumps(cfg, indent=2).encode()
    files["config.json"] = hashlib.sha256(raw).hexdigest()
    (blobs / files["config.json"]).write_bytes(raw)
    snap, _ = link_snapshot(repo, files)
    wbytes = sum(_nbytes(s, d.dtype) for s in weight_shapes(d).values())
    return Made(snap, wbytes, d.kv_bytes)


# -- the model ------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(w.dtype) * w


class TinyLM:
    """Weights, KV buffer and decode step on one device.  ``weights`` and ``kv`` may be None
    (asleep); :meth:`step` needs both."""

    def __init__(self, d: Dims, device: torch.device):
        self.d = d
        self.device = device
        self.weights: dict[str, torch.Tensor] | None = None
        self.kv: torch.Tensor | None = None
        self.scale = 1.0 / math.sqrt(d.hidden)
        self.positions = torch.arange(d.window, device=device)

    def alloc_weights(self) -> None:
        self.weights = {n: torch.empty(s, dtype=self.d.dtype, device=self.device)
                        for n, s in weight_shapes(self.d).items()}

    def alloc_kv(self) -> None:
        self.kv = torch.zeros((2, self.d.layers, self.d.kv_tokens, self.d.hidden), dtype=self.d.dtype,
                              device=self.device)

    def weights_bytes(self) -> int:
        w = self.weights  # read once: the engine's watch thread calls this too
        return sum(t.numel() * t.element_size() for t in w.values()) if w else 0

    def kv_bytes(self) -> int:
        kv = self.kv
        return kv.numel() * kv.element_size() if kv is not None else 0

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok, pos: int64 [1] on the device.  Writes K/V at pos; returns the next token id [1]."""
        w, kv, W = self.weights, self.kv, self.d.window
        assert w is not None and kv is not None
        x = w["embed.weight"].index_select(0, tok)  # [1, h]
        masked = self.positions > pos  # [W]
        for i in range(self.d.layers):
            p = f"layers.{i}."
            h = _rms(x, w[p + "norm1.weight"])
            q, k, v = torch.nn.functional.linear(h, w[p + "wqkv.weight"]).chunk(3, dim=-1)
            kc, vc = kv[0, i, :W], kv[1, i, :W]
            kc.index_copy_(0, pos, k)
            vc.index_copy_(0, pos, v)
            scores = (kc @ q[0]).float() * self.scale  # [W]
            probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).to(x.dtype)
            x = x + torch.nn.functional.linear((probs @ vc)[None], w[p + "wo.weight"])
            h = _rms(x, w[p + "norm2.weight"])
            up = torch.nn.functional.gelu(torch.nn.functional.linear(h, w[p + "up.weight"]), approximate="tanh")
            x = x + torch.nn.functional.linear(up, w[p + "down.weight"])
        logits = torch.nn.functional.linear(_rms(x, w["norm.weight"]), w["lm_head.weight"])  # [1, vocab]
        return logits.float().argmax(dim=-1)

    def embed_text(self, ids: list[int]) -> list[float]:
        """A unit-norm embedding: the mean of the token embeddings (float32)."""
        assert self.weights is not None
        e = self.weights["embed.weight"].index_select(0, torch.tensor(ids, device=self.device)).float().mean(0)
        return (e / e.norm().clamp_min(1e-12)).cpu().tolist()

    def checksum(self, chunk: int = 1 << 24) -> str:
        """A digest of the weights' bits (to see that a reload put back the same bytes), computed
        on the device in chunks (little temporary memory)."""
        if not self.weights:
            return ""
        h = hashlib.sha256()
        for name, t in self.weights.items():
            flat = (t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)).reshape(-1)
            s1 = s2 = 0
            for start in range(0, flat.numel(), chunk):
                b = flat[start:start + chunk].to(torch.int64)
                idx = torch.arange(start + 1, start + 1 + b.numel(), device=t.device, dtype=torch.int64)
                s1 += int(b.sum().item())
                s2 += int((b * (idx % 1000003)).sum().item())
            h.update(f"{name}:{s1}:{s2};".encode())
        return h.hexdigest()[:16]
