"""Which keys are valid where in a sweep, and the closest valid key to a mistyped one (sweep-key suggestions).

Derived from the pydantic schema itself (one owner: `manifests.schema`), so a new field is suggested
as soon as it is declared. Invisible characters (zero-width spaces, BOMs, soft hyphens: Unicode
category Cf) and compatibility forms (NFKC) are normalised away before comparing, so a key pasted from
a web page is matched to the key that was meant, and the message says what was invisible.
"""

from __future__ import annotations

import difflib
import typing
import unicodedata

from pydantic import BaseModel

MAX_KEY_SHOWN = 80  # longer keys are cut in messages (no schema key comes close)


def normalise_key(key: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKC", key) if unicodedata.category(c) != "Cf").strip().lower()


def invisible_characters(key: str) -> list[str]:
    """'U+200B ZERO WIDTH SPACE' for every invisible or non-printing character in `key`."""
    return [
        f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}"
        for c in key
        if unicodedata.category(c) in ("Cf", "Cc", "Zl", "Zp") or (c.isspace() and c != " ")
    ]


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    return None if field is None else field.default


def models_at(root: type[BaseModel], path: tuple) -> list[type[BaseModel]]:
    """The schema models that may hold the keys at `path` (a pydantic error location without its last key)."""
    candidates = [root]
    for part in path:
        if isinstance(part, int):
            continue  # a list position: the element's model is already the candidate
        holders = [m for m in candidates if part in m.model_fields]
        if holders:
            candidates = [inner for m in holders for inner in _models_in(m.model_fields[part].annotation)]
        else:  # a discriminated union's tag ('slurm') or a pydantic validator frame: narrow, or keep
            tagged = [m for m in candidates if _tag_of(m) == part]
            candidates = tagged or candidates
        if not candidates:
            return []
    return candidates


def valid_keys(models: list[type[BaseModel]]) -> list[str]:
    keys: list[str] = []
    for m in models:
        keys += [k for k in m.model_fields if k not in keys]
    return keys


def closest_key(key: str, keys: list[str]) -> str | None:
    if len(key) > MAX_KEY_SHOWN:
        return None  # no schema key is that long; comparing would only cost time
    wanted = normalise_key(key)
    for k in keys:
        if normalise_key(k) == wanted:
            return k
    match = difflib.get_close_matches(wanted, keys, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_message(key: str, keys: list[str]) -> str:
    """'unknown key …; did you mean …? valid keys here: …' with invisible characters spelled out."""
    shown = ascii(key)[1:-1] if not key.isprintable() or invisible_characters(key) else key
    if len(shown) > MAX_KEY_SHOWN:
        shown = shown[:MAX_KEY_SHOWN] + f"… ({len(key)} characters)"
    parts = [f"unknown key {shown!r}"]
    hidden = sorted(set(invisible_characters(key[:MAX_KEY_SHOWN])))
    if hidden:
        parts.append(f"it contains invisible character(s) {', '.join(hidden)}")
    suggestion = closest_key(key, keys)
    if suggestion is not None:
        parts.append(f"did you mean {suggestion!r}?")
    if keys:
        parts.append(f"valid keys here: {', '.join(keys)}")
    return "; ".join(parts)


def keys_related(a: str, b: str) -> bool:
    """One dotted key is the other or lies inside it (a problem of `arms.1.intervention` concerns `arms.1.intervention.bias`)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")
