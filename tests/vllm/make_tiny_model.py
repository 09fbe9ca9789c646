"""Make a tiny random Qwen3ForCausalLM that the real vLLM (CPU build) serves, without network access.

Run with the vLLM venv's python (scripts/setup-vllm.sh does, for the three test models):

    /opt/llmuxd/vllm-venv/bin/python tests/vllm/make_tiny_model.py \
        --hf-home /opt/llmuxd/vllm-hf --repo llmuxd-test/tiny-a --seed 1

The model: vocab 1024, hidden 128, 2 layers, 2 heads / 1 KV head, head_dim 64, bf16 (~0.4 M
parameters), random weights from ``--seed``; a byte-level BPE tokenizer trained here with
``tokenizers`` on generated text (the same for every seed), a ChatML chat template and a generation
config. It is saved with ``save_pretrained`` and laid out as a HuggingFace hub cache:

    HF_HOME/hub/models--ORG--NAME/blobs/<sha256>
                                 /refs/main                       (the commit)
                                 /snapshots/<commit>/<file> -> ../../blobs/<sha256>

so ``HF_HUB_OFFLINE=1 HF_HOME=... vllm serve ORG/NAME`` resolves it by repo id. The commit is a
hash of the files, so the same seed gives the same layout. Greedy answers are gibberish, but
deterministic, and differ between seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

VOCAB = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "the a an model server switch sleep wake weights cache process checkpoint restore dump port "
    "request answer token stream queue drain evict load start stop fast slow one two three four "
    "five six seven eight nine ten hello world what is how are you today please tell me about "
    "vllm llmuxd linux kernel memory page file socket engine worker core gpu cpu time second "
    "minute hour day night good bad new old small large tiny random text number letter word"
).split()


def corpus(n_lines: int = 4000) -> list[str]:
    """Generated training text for the tokenizer: fixed seed, so every model gets the same vocab."""
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 10_000)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ","]))
    lines += ["".join(chr(c) for c in range(32, 127))]  # every printable ASCII character
    return lines


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML
    return fast


def make_model(seed: int, tok):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        initializer_range=0.1,  # peakier logits than 0.02: greedy answers differ clearly by seed
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="bfloat16",
    )
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lay_out_cache(src: Path, hf_home: Path, repo: str) -> Path:
    """Move the files of ``src`` into HF_HOME/hub as repo ``repo``; return the snapshot folder."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digests = {p.relative_to(src).as_posix(): sha256_file(p) for p in files}
    commit = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    blobs = repo_dir / "blobs"
    snap = repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in files:
        rel = p.relative_to(src).as_posix()
        blob = blobs / digests[rel]
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-home", default=os.environ.get("HF_HOME", "/opt/llmuxd/vllm-hf"))
    ap.add_argument("--repo", required=True, help="ORG/NAME, e.g. llmuxd-test/tiny-a")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--force", action="store_true", help="re-make it even when it exists")
    args = ap.parse_args(argv)
    if args.repo.count("/") != 1:
        ap.error("--repo must be ORG/NAME")
    hf_home = Path(args.hf_home)
    repo_dir = hf_home / "hub" / ("models--" + args.repo.replace("/", "--"))
    if (repo_dir / "refs" / "main").exists() and not args.force:
        print(f"{args.repo}: already in {hf_home}")
        return 0

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = make_tokenizer()
    model = make_model(args.seed, tok)
    hf_home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hf_home, prefix=".make-") as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        snap = lay_out_cache(out, hf_home, args.repo)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.repo}: seed {args.seed}, {n / 1e6:.2f} M parameters -> {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
