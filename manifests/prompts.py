"""Prompt sets: the bundled GenEval sets and user files, resolved to a list of `Prompt`.

`prompt_id` is the position of the prompt in its set (before slicing): it is what the seed rule uses,
so the paper's `seed = 42 + i` over a set is `seeds.base = 42`. GenEval prompts keep their official tag
and object metadata; the balanced subset is joined to GenEval by its exact text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

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


def load_file(path: Path) -> list[Prompt]:
    """A .txt file (one prompt per non-empty line) or a .jsonl file with a "prompt" field (and optional "tag")."""
    text = path.read_text(encoding="utf-8")
    prompts: list[Prompt] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f'{path}:{lineno}: expected an object with a non-empty string "prompt"')
            meta = {k: v for k, v in record.items() if k not in ("prompt", "tag")}
            prompts.append(Prompt(len(prompts), record["prompt"], record.get("tag"), None, json.dumps(meta, sort_keys=True)))
    else:
        for line in text.splitlines():
            if line.strip():
                prompts.append(Prompt(len(prompts), line.strip()))
    return prompts
