"""Bounded YAML reading for sweep files: any file is answered in about a second, with a short message.

PyYAML alone will happily expand an alias bomb, recurse through a 10 000-deep nesting until Python's
stack gives out, keep the last of two equal keys, and take minutes on a multi-megabyte file without
libyaml. So before anything is built:

- the file's size is capped (`MAX_SWEEP_BYTES`) and it must decode as UTF-8 (`manifests.text`: the byte offset is named);
- a first pass over libyaml's event stream (flat, no recursion) bounds the nesting depth, the number of
  aliases, and the number of nodes the document would have once every alias is expanded;
- the document is then constructed by a loader that rejects duplicate keys in a mapping.

PyYAML has no such limits of its own, hence this module. `CSafeLoader` (libyaml) is used where installed.
"""

from __future__ import annotations

from typing import Any

import yaml

from manifests.text import NotUtf8Error, decode_utf8

MAX_SWEEP_BYTES = 1 << 20  # 1 MiB: a sweep with thousands of arms and explicit prompt ids is far below it
MAX_DEPTH = 32  # nested mappings/sequences; the deepest real sweep (arm_grid → vary → step_window) is 5
MAX_ALIASES = 100  # `*anchor` references in one file
MAX_NODES = 50_000  # scalars + collections after expanding every alias (a billion-laughs file has 10⁹; a large real sweep a few thousand)

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlLimitError(ValueError):
    """The text is not a YAML document this project will read. The message is one short line."""


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def check_structure(text: str) -> None:
    """Walk the event stream once, bounding depth, aliases and the expanded node count."""
    depth = 0
    aliases = 0
    # one counter per open collection: nodes inside it, aliases expanded; anchors -> expanded size
    open_sizes: list[tuple[int, str | None]] = []
    anchor_size: dict[str, int] = {}
    total = 0
    try:
        for event in yaml.parse(text, Loader=SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlLimitError(f"{_where(event.start_mark)}nested more than {MAX_DEPTH} levels deep")
                open_sizes.append((total, event.anchor))
                total += 1
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
                start, anchor = open_sizes.pop()
                if anchor is not None:
                    anchor_size[anchor] = total - start
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                if event.anchor is not None:
                    anchor_size[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise YamlLimitError(f"{_where(event.start_mark)}more than {MAX_ALIASES} aliases (*name)")
                total += anchor_size.get(event.anchor, 1)  # an undefined anchor is reported by the loader
            if total > MAX_NODES:
                raise YamlLimitError(
                    f"{_where(event.start_mark)}the document expands to more than {MAX_NODES} values "
                    f"(aliases included); a sweep file is far smaller"
                )
    except yaml.YAMLError as e:
        raise YamlLimitError(describe_yaml_error(e, text)) from None


def describe_yaml_error(error: yaml.YAMLError, text: str = "") -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    hint = ""
    if mark is not None and 0 <= mark.index < len(text) and text[mark.index] == "\t":
        hint = "; YAML indents with spaces, not tabs"
    return f"{_where(mark)}not valid YAML ({context + ', ' if context else ''}{problem}{hint})"


class _UniqueKeyLoader(SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says keys are unique; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by the mapping's own keys
                # a plain scalar key is compared by its resolved tag and text (constructing it twice costs time)
                key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "a mapping key must be a plain value, not a list or mapping", key_node.start_mark
                    ) from None
                if first is not None:
                    shown = key[1] if isinstance(key_node, yaml.ScalarNode) else key
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shown!r} (first given on line {first.line + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_bounded(data: bytes, what: str = "file") -> Any:
    """Parse one YAML document from `data` within the limits above; raises YamlLimitError with one short line."""
    if len(data) > MAX_SWEEP_BYTES:
        raise YamlLimitError(f"{what} is {len(data)} bytes; a sweep file may be at most {MAX_SWEEP_BYTES} bytes")
    try:
        text = decode_utf8(data, what)
    except NotUtf8Error as e:
        raise YamlLimitError(str(e)) from None
    check_structure(text)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as e:
        raise YamlLimitError(describe_yaml_error(e, text)) from None
    except RecursionError:  # unreachable after check_structure, kept so no traceback can escape
        raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep") from None
