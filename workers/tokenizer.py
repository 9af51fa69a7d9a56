"""CLIP tokenizer files rebuilt offline from the BPE table that open_clip ships.

SD3 / SDXL use OpenAI's CLIP BPE (49408 tokens). No weights or tokenizer files can be downloaded in our
test and demo settings, but open_clip_torch installs `bpe_simple_vocab_16e6.txt.gz`, which holds the same
merges. We turn it into the vocab.json / merges.txt pair that `transformers.CLIPTokenizer` reads, once,
into a cache directory shared by all processes (written to a temp dir, then renamed: safe under races).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from manifests.schema import sinkscope_cache_root

# OpenAI CLIP: 256 byte symbols, 256 byte symbols + "</w>", 48894 merges, 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def cache_root() -> Path:
    """`$SINKSCOPE_CACHE`, else ~/.cache/sinkscope (the rule is manifests.schema.sinkscope_cache_root)."""
    return sinkscope_cache_root()


def shipped_bpe_file() -> Path:
    """The gzipped BPE table inside the installed open_clip package."""
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open_clip is a hard dependency
        raise FileNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE table (pip install open_clip_torch)") from exc
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch installation")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table, in byte order of the vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(out_dir: Path, pad_token: str = END_TOKEN, model_max_length: int = 77) -> Path:
    """Write the four files `CLIPTokenizer.from_pretrained(out_dir)` needs."""
    lines = gzip.open(shipped_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START_TOKEN, END_TOKEN]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, "errors": "replace", **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=1), encoding="utf-8")
    return out_dir


def clip_tokenizer_dir(pad_token: str = END_TOKEN) -> Path:
    """Cached tokenizer directory for the given pad token (SD3's second CLIP pads with "!")."""
    name = "clip-bpe-pad-endoftext" if pad_token == END_TOKEN else f"clip-bpe-pad-{ord(pad_token[0]):x}-{len(pad_token)}"
    target = cache_root() / "tokenizers" / name
    if all((target / f).is_file() for f in _FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_clip_tokenizer(staging, pad_token=pad_token)
        try:
            os.replace(staging, target)  # atomic when `target` does not exist yet
        except OSError:
            if not all((target / f).is_file() for f in _FILES):  # lost a race to a broken dir: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_clip_tokenizer(pad_token: str = END_TOKEN):
    """A transformers CLIPTokenizer with OpenAI's vocabulary, built without network access."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token)))


# --- T5 stand-in -------------------------------------------------------------------------------------
# T5's SentencePiece model cannot be downloaded here and `sentencepiece` is not installed, so the tiny Flux
# and PixArt presets use a small Unigram tokenizer built deterministically from the bundled GenEval prompts
# (no training, no randomness): one piece per GenEval word, scored by its log frequency, plus single
# characters as a fallback so any ASCII text tokenizes. It keeps what the sink bookkeeping depends on —
# T5's special ids (<pad>=0, </s>=1, <unk>=2), EOS appended, right padding to max_length with attention
# mask 0 — but not T5's 32k vocabulary. Real models always load their own tokenizer.

_FALLBACK_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&+"


def t5_stand_in_vocab() -> list[tuple[str, float]]:
    """[(piece, log-probability score)] in id order: specials, "▁", GenEval words by frequency, then characters."""
    import math
    from collections import Counter

    from manifests import load_bundled_prompts

    counts = Counter(word for p in load_bundled_prompts("geneval") for word in p.text.split())
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -12.0)]
    vocab += [("\u2581" + w, math.log(counts[w] / total)) for w in words]
    vocab += [(c, -15.0) for c in _FALLBACK_CHARS]
    return vocab


def load_t5_tokenizer(model_max_length: int = 512):
    """A transformers T5Tokenizer (tokenizers backend) over `t5_stand_in_vocab()`, built in memory."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_stand_in_vocab(), extra_ids=0, model_max_length=model_max_length)


# --- Qwen stand-in -----------------------------------------------------------------------------------
# Qwen2.5-VL (Qwen-Image) and Qwen3 (Z-Image) share Qwen2's byte-level BPE (151k tokens), which cannot be
# downloaded here. The tiny presets use a small byte-level BPE trained deterministically by the `tokenizers`
# library on the bundled GenEval prompts and the pipelines' prompt templates, wrapped in transformers'
# `Qwen2Tokenizer` (so the Qwen pre-tokenizer regex, byte-level decoding and the class the pipelines expect
# are the real ones), with Qwen's chat special tokens. It keeps what the pipelines and the sink bookkeeping
# depend on — <|im_start|> / <|im_end|> / <|endoftext|> as single special tokens, <|endoftext|> as pad, a chat
# template that renders Qwen's `<|im_start|>role\n…<|im_end|>\n` turns — but not Qwen's vocabulary.

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_QWEN_VOCAB_SIZE = 1024
# Qwen3's template, reduced to what a single-turn text prompt uses: `enable_thinking=False` adds an empty think block
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_training_text() -> list[str]:
    from manifests import load_bundled_prompts

    templates = [
        "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
        "objects and background:", "system", "user", "assistant",
    ]
    return templates + [p.text for p in load_bundled_prompts("geneval")]


def qwen_stand_in_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the stand-in: byte-level BPE trained on `_qwen_training_text()` (deterministic)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=_QWEN_VOCAB_SIZE, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_qwen_training_text(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def load_qwen_tokenizer(model_max_length: int = 32768):
    """A transformers Qwen2Tokenizer over `qwen_stand_in_bpe()` with Qwen's chat specials, built in memory."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_stand_in_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length, additional_special_tokens=list(QWEN_SPECIALS[1:]),
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
