"""What the text encoders see: capture every tokenizer call of a prompt encoding, and apply prompt-side edits.

The pipelines tokenize inside their own `encode_prompt`. Instead of re-implementing each family's encoding,
the pipeline's tokenizers are swapped, for the duration of one encoding, for thin wrappers that (a) apply the
arm's `PromptEdit` to the `padding="max_length"` calls (the ones whose ids reach the encoder; the
`padding="longest"` truncation checks pass through) and (b) log the ids and attention mask each call returned.
The log gives the text keys of the denoiser (`manifests.keys.TextKey`: segment, position, token, kind) in
canonical order [CLIP | T5], exactly as encoded, edits included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import cycle, islice

from manifests.interventions import PromptEdit
from manifests.keys import TextKey, text_kind

# family -> {tokenizer attribute: encoder segment}; a segment's first attribute in KEY_SOURCES gives the text keys
TOKENIZER_SEGMENTS = {
    "sd3": {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
    "sdxl": {"tokenizer": "clip", "tokenizer_2": "clip"},
    "flux": {"tokenizer": "clip", "tokenizer_2": "t5"},  # Flux's CLIP is pooled only: it has no text keys
    "pixart": {"tokenizer": "t5"},
    "wan": {"tokenizer": "t5"},  # UMT5
    "ltx": {"tokenizer": "t5"},
    "qwen_image": {"tokenizer": "t5"},  # Qwen2.5-VL's tokens take the sequence-text ("t5") segment
    "z_image": {"tokenizer": "t5"},  # Qwen3's likewise
}
KEY_SOURCES = {
    "sd3": (("tokenizer", "clip"), ("tokenizer_3", "t5")),
    "sdxl": (("tokenizer", "clip"),),
    "flux": (("tokenizer_2", "t5"),),
    "pixart": (("tokenizer", "t5"),),
    "wan": (("tokenizer", "t5"),),
    "ltx": (("tokenizer", "t5"),),
    "qwen_image": (("tokenizer", "t5"),),
    "z_image": (("tokenizer", "t5"),),
}
# the tokenizer `padding` of the calls whose ids reach the encoder, where it is not "max_length": Qwen-Image
# tokenizes its chat-template prompt at its own length (padding=True, i.e. to the longest of one)
ENCODING_PADDING = {"qwen_image": True}


@dataclass
class TokenizerCall:
    attribute: str
    text: str
    input_ids: list[int]
    attention_mask: list[int]


@dataclass
class EncodingLog:
    """The `max_length` tokenizer calls of one prompt encoding, in call order."""

    calls: list[TokenizerCall] = field(default_factory=list)

    def nth(self, attribute: str, n: int) -> TokenizerCall | None:
        """The n-th call of one tokenizer: 0 is the prompt, 1 the negative prompt (pipelines encode in that order)."""
        calls = [c for c in self.calls if c.attribute == attribute]
        return calls[n] if n < len(calls) else None


def _text_of(text) -> str:
    if isinstance(text, (list, tuple)):
        if len(text) != 1:
            raise ValueError(f"prompt-side capture expects one prompt per call, got {len(text)}")
        return text[0]
    return text


def fill_ids(tokenizer, edit: PromptEdit) -> list[int]:
    """The token ids that fill padding slots under `edit` (a vocabulary token, or a string's tokens)."""
    if edit.pad_token is not None:
        vocab = tokenizer.get_vocab()
        if edit.pad_token not in vocab:
            raise ValueError(f"prompt.pad_token {edit.pad_token!r} is not a token of {type(tokenizer).__name__}'s vocabulary")
        return [vocab[edit.pad_token]]
    ids = tokenizer(edit.pad_text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"prompt.pad_text {edit.pad_text!r} tokenizes to nothing")
    return list(ids)


class EditingTokenizer:
    """Wraps a tokenizer: applies a PromptEdit to `padding="max_length"` calls and logs what they return."""

    def __init__(self, inner, attribute: str, segment: str, prompt: str, edit: PromptEdit | None, log: EncodingLog,
                 encoding_padding: str | bool = "max_length"):
        self.inner, self.attribute, self.segment, self.prompt, self.log = inner, attribute, segment, prompt, log
        self.edit = edit if edit is not None and edit.applies_to(segment) else None
        self.encoding_padding = encoding_padding

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def _length(self, max_length: int, add_special_tokens: bool) -> int:
        edit = self.edit
        length = edit.max_length or max_length
        if edit.padding_slots is not None:  # measured on the conditional prompt, so cond and uncond stay the same length
            real = len(self.inner(self.prompt, truncation=True, max_length=length, add_special_tokens=add_special_tokens).input_ids)
            length = min(length, real + edit.padding_slots)
        return length

    def __call__(self, text, *args, **kwargs):
        if kwargs.get("padding") != self.encoding_padding:
            return self.inner(text, *args, **kwargs)
        if self.edit is not None:
            kwargs["max_length"] = self._length(kwargs["max_length"], kwargs.get("add_special_tokens", True))
        kwargs["return_attention_mask"] = True
        out = self.inner(text, *args, **kwargs)
        ids, mask = out["input_ids"], out["attention_mask"]
        if self.edit is not None and (self.edit.pad_token or self.edit.pad_text):
            fill = fill_ids(self.inner, self.edit)
            ids = ids.clone() if hasattr(ids, "clone") else [list(row) for row in ids]
            for row in range(len(ids)):
                slots = [j for j, m in enumerate(mask[row]) if not int(m)]
                for j, token in zip(slots, islice(cycle(fill), len(slots))):
                    ids[row][j] = token
            out["input_ids"] = ids
        first_ids = ids[0] if len(ids) and not isinstance(ids[0], int) else ids
        first_mask = mask[0] if len(mask) and not isinstance(mask[0], int) else mask
        self.log.calls.append(TokenizerCall(self.attribute, _text_of(text), [int(i) for i in first_ids], [int(m) for m in first_mask]))
        return out


@contextlib.contextmanager
def capture(pipe, family: str, prompt: str, edit: PromptEdit | None):
    """Within the block, the pipeline's tokenizers apply `edit` and log their calls (yielded EncodingLog)."""
    log = EncodingLog()
    swapped = {}
    for attribute, segment in TOKENIZER_SEGMENTS[family].items():
        inner = getattr(pipe, attribute, None)
        if inner is not None:
            swapped[attribute] = inner
            # bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline config
            pipe.__dict__[attribute] = EditingTokenizer(inner, attribute, segment, prompt, edit, log,
                                                        ENCODING_PADDING.get(family, "max_length"))
    try:
        yield log
    finally:
        for attribute, inner in swapped.items():
            pipe.__dict__[attribute] = inner


def _keys_of(tokenizer, call: TokenizerCall, segment: str) -> tuple[TextKey, ...]:
    return call_keys(tokenizer, call, segment)


def call_keys(tokenizer, call: TokenizerCall, segment: str, start: int = 0, stop: int | None = None) -> tuple[TextKey, ...]:
    """The text keys of one logged call's tokens [start:stop] (positions counted from `start`), e.g. Qwen-Image's
    chat turn after the system prefix its pipeline drops."""
    ids, mask = call.input_ids[start:stop], call.attention_mask[start:stop]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    return tuple(
        TextKey(segment, j, token, text_kind(bool(m), i in special))
        for j, (i, token, m) in enumerate(zip(ids, tokens, mask))
    )


def text_keys(pipe, family: str, log: EncodingLog, which: int, zero_slots: dict[str, int]) -> tuple[TextKey, ...]:
    """The denoiser's text keys of the prompt (`which` 0) or the negative prompt (1), canonical order [CLIP | T5].

    A segment whose tokenizer was not called holds zero vectors (SD3 without T5; SDXL's zeroed empty negative
    prompt): `zero_slots[segment]` slots of kind padding and no token.
    """
    keys: list[TextKey] = []
    for attribute, segment in KEY_SOURCES[family]:
        call = log.nth(attribute, which)
        if call is None:
            keys += [TextKey(segment, j, None, "padding") for j in range(zero_slots.get(segment, 0))]
        else:
            keys += _keys_of(getattr(pipe, attribute), call, segment)
    return tuple(keys)
