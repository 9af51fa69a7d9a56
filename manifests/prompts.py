"""Prompt sets: the bundled GenEval sets and user files, resolved to a list of `Prompt`.

`prompt_id` is the position of the prompt in its set (before slicing): it is what the seed rule uses,
so the paper's `seed = 42 + i` over a set is `seeds.base = 42`. GenEval prompts keep their official tag
and object metadata; the balanced subset is joined to GenEval by its exact text.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from manifests.text import decode_utf8

BUNDLED_SETS = ("geneval", "geneval-balanced-100", "toy-geneval")


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str
    tag: str | None = None
    geneval_index: int | None = None
    metadata: str = field(default="{}", repr=False)  # JSON of the GenEval record (objects, counts, colours)


def _data_file(*parts: str) -> Path:
    return Path(str(resources.files("manifests").joinpath("data", *parts)))


@lru_cache(maxsize=None)
def _records(*parts: str) -> tuple[dict, ...]:
    with open(_data_file(*parts), encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _geneval_records() -> tuple[dict, ...]:
    return _records("geneval", "evaluation_metadata.jsonl")


def _geneval_prompt(position: int, record: dict, geneval_index: int | None) -> Prompt:
    meta = {k: v for k, v in record.items() if k not in ("prompt", "tag")}
    return Prompt(position, record["prompt"], record.get("tag"), geneval_index, json.dumps(meta, sort_keys=True))


def load_bundled(name: str) -> list[Prompt]:
    records = _geneval_records()
    if name == "geneval":
        return [_geneval_prompt(i, r, i) for i, r in enumerate(records)]
    if name == "geneval-balanced-100":
        by_text = {r["prompt"]: i for i, r in enumerate(records)}
        lines = _data_file("paper", "prompts_geneval_balanced_100.txt").read_text(encoding="utf-8").splitlines()
        texts = [t.strip() for t in lines if t.strip()]
        return [_geneval_prompt(i, records[by_text[t]], by_text[t]) for i, t in enumerate(texts)]
    if name == "toy-geneval":  # the toy world's prompts (workers.toy.scenes.evaluation_records), GenEval's format
        return [_geneval_prompt(i, r, None) for i, r in enumerate(_records("toy", "toy_geneval.jsonl"))]
    raise ValueError(f"unknown bundled prompt set {name!r}; expected one of {', '.join(BUNDLED_SETS)}")


def _text_problem(text: str, line_breaks_allowed: bool) -> str | None:
    """Why a prompt cannot be used as it is, or None. NUL and other control characters never (tab excepted);
    in a .txt file not the Unicode line / paragraph separators either (they would hide a second prompt in one
    line); a .jsonl prompt may hold "\n", "\r", U+2028 and U+2029 (escaped), since its line is its record."""
    allowed = {"\t", "\n", "\r", "\u2028", "\u2029"} if line_breaks_allowed else {"\t"}
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") and c not in allowed})
    if not bad:
        return None
    names = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'control character')}" for c in bad[:5])
    hint = "remove it" if line_breaks_allowed else "a prompt is one line of text; remove it, or use a .jsonl file for multi-line text"
    return f"contains {names}; {hint}"


def split_lines(text: str) -> list[str]:
    """Lines on "\n" only (a "\r" before it is dropped): `str.splitlines` also breaks on vertical tab, form feed,
    U+2028 and others, which would shift every later prompt id off its line number."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_file(path: Path) -> list[Prompt]:
    """A .txt file (one prompt per non-empty line) or a .jsonl file with a "prompt" field (and optional "tag").

    A prompt's id is its line number − 1 (0-based, like the bundled sets), blank lines included, so the id of any
    prompt can be read off the file. Every bad line is reported with its line number."""
    prompts: list[Prompt] = []
    problems: list[str] = []
    for index, line in enumerate(split_lines(decode_utf8(path.read_bytes(), str(path)))):
        lineno = index + 1
        if not line.strip(" \t"):
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                problems.append(f'{path}:{lineno}: expected an object with a non-empty string "prompt"')
                continue
            tag = record.get("tag")
            if tag is not None and not isinstance(tag, str):
                problems.append(f'{path}:{lineno}: "tag" must be a string')
                continue
            text = record["prompt"]
            meta = json.dumps({k: v for k, v in record.items() if k not in ("prompt", "tag")}, sort_keys=True)
        else:
            text, tag, meta = line.strip(" \t"), None, "{}"
        problem = _text_problem(text, line_breaks_allowed=path.suffix == ".jsonl")
        if problem:
            problems.append(f"{path}:{lineno}: {problem}")
            continue
        prompts.append(Prompt(index, text, tag, None, meta))
    if problems:
        shown = problems[:10] + ([f"… and {len(problems) - 10} more bad line(s)"] if len(problems) > 10 else [])
        raise ValueError("\n".join(shown))
    return prompts
