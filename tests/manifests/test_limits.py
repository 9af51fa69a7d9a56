"""Hostile sweep and prompt files: every one is refused with a short message naming the file, never expanded.

The files here are generated (too big to keep in malformed/). No timing is asserted; the time each takes is
measured by benchmarks/bench_sweep_limits.py.
"""

from pathlib import Path

import pytest
import yaml

from manifests import SweepError, read_sweep_file, resolve_prompts
from manifests.suggest import closest_key, unknown_key_message
from manifests.load import MAX_PROBLEMS
from manifests.safe_yaml import MAX_DEPTH, MAX_SWEEP_BYTES, YamlLimitError, load_bounded

HEAD = "name: hostile\nmodel: {preset: tiny-sd3}\nprompts: {set: geneval, limit: 2}\narms: [{name: baseline}]\n"


def _refused(path: Path) -> str:
    with pytest.raises(SweepError) as info:
        read_sweep_file(path)
    message = str(info.value)
    assert str(path) in message
    assert len(message) < 10_000, f"message of {len(message)} characters"
    return message


def test_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(HEAD + "prompts_ids: [" + ", ".join(["1"] * (MAX_SWEEP_BYTES // 3)) + "]\n")
    assert f"may be at most {MAX_SWEEP_BYTES} bytes" in _refused(path)


def test_many_unknown_keys_give_a_bounded_message(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(HEAD + "".join(f"unknown_key_{i}: {i}\n" for i in range(15_000)))
    message = _refused(path)
    assert "unknown key 'unknown_key_0'" in message
    assert f"and {15_000 - MAX_PROBLEMS} more problem(s)" in message


def test_a_huge_id_list_under_the_size_limit_is_not_quoted_back(tmp_path):
    path = tmp_path / "ids.yaml"
    ids = list(range(30_000))
    path.write_text(HEAD.replace("{set: geneval, limit: 2}", "{set: geneval, ids: " + str(ids) + "}"))
    message = _refused(path)
    assert "prompts.ids: List should have at most 20000 items" in message
    assert "29999" not in message
    path.write_text(HEAD.replace("{set: geneval, limit: 2}", "{set: geneval, ids: " + str(list(range(60_000))) + "}"))
    assert "expands to more than 50000 values" in _refused(path)  # refused while parsing


def test_alias_bomb_is_refused_without_expanding(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for parent, child in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{child}: &{child} [" + ",".join([f"*{parent}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert "expands to more than" in _refused(path)


def test_aliases_within_the_limits_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "name: anchors\nmodel: {preset: tiny-sd3}\nprompts: {set: geneval, limit: 2}\n"
        "arms:\n  - {name: a, intervention: &iv {preset: fixed.m1, layers: [1]}}\n"
        "  - {name: b, intervention: {<<: *iv, k: 2}}\n"
    )
    sweep, _ = read_sweep_file(path)
    assert [a.intervention.k for a in sweep.arms] == [1, 2]


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(HEAD + "description:\n" + "".join("  " * i + "- \n" for i in range(1, 500)))
    assert f"nested more than {MAX_DEPTH} levels deep" in _refused(path)
    path.write_text(HEAD + "description: " + "[" * 10_000 + "]" * 10_000 + "\n")  # libyaml stops flow nesting itself
    assert "exceeded maximum nesting depth" in _refused(path)


def test_duplicate_keys_are_refused_at_any_depth():
    with pytest.raises(YamlLimitError, match=r"line 3, column 1: not valid YAML \(duplicate key 'arms' \(first given on line 1\)\)"):
        load_bounded(b"arms: [1]\nname: x\narms: [2]\n")
    with pytest.raises(YamlLimitError, match="duplicate key 'k'"):
        load_bounded(b"a: {b: {k: 1, k: 1}}\n")
    assert load_bounded(b"base: &b {k: 1}\nover: {<<: *b, k: 2}\n")["over"] == {"k": 2}  # a merge may be overridden


def test_not_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(HEAD.encode() + b"description: na\xefve\n")
    offset = len(HEAD.encode()) + len(b"description: na")
    assert f"byte 0xef at byte offset {offset} (line 5)" in _refused(path)


@pytest.mark.parametrize(
    "key, meant",
    [("na\u200bme", "name"), ("\ufeffmodel", "model"), ("Arms", "arms"), ("outptu_root", "output_root"), ("ｓｅｅｄｓ", "seeds")],
)
def test_closest_key_after_normalising_invisible_characters(key, meant):
    keys = ["name", "model", "prompts", "seeds", "arms", "output_root"]
    assert closest_key(key, keys) == meant
    message = unknown_key_message(key, keys)
    assert f"did you mean {meant!r}" in message
    if "\u200b" in key:
        assert "U+200B ZERO WIDTH SPACE" in message and "\\u200b" in message


def test_no_suggestion_for_a_key_unlike_any():
    assert closest_key("zzzzzz", ["name", "model"]) is None
    assert "did you mean" not in unknown_key_message("zzzzzz", ["name", "model"])


# ---- prompt files --------------------------------------------------------------------------------------------------


def _prompt_sweep(tmp_path: Path, content: bytes, suffix: str = ".txt") -> Path:
    (tmp_path / f"p{suffix}").write_bytes(content)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "model": {"preset": "tiny-sd3"}, "prompts": {"file": f"p{suffix}"},
                                    "arms": [{"name": "b"}]}))
    return path


@pytest.mark.parametrize("char, name", [("\x0b", "U+000B"), ("\x0c", "U+000C"), ("\u2028", "U+2028 LINE SEPARATOR"),
                                        ("\u2029", "U+2029 PARAGRAPH SEPARATOR"), ("\x00", "U+0000"), ("\x1b", "U+001B"),
                                        ("\x85", "U+0085")])
def test_line_breaks_other_than_newline_and_controls_are_refused_by_line(tmp_path, char, name):
    lines = [f"prompt {i}" for i in range(13)]
    lines[6] = f"half{char}half"
    message = _refused(_prompt_sweep(tmp_path, ("\n".join(lines) + "\n").encode()))
    assert f"p.txt:7: contains {name}" in message


def test_prompt_ids_are_line_numbers_and_hostile_text_comes_back_verbatim(tmp_path):
    hostile = ["a cat; rm -rf ~", "$(reboot) `id`", "../../etc/passwd", "\u202eRTL override\u202c", "tab\tinside",
               "quotes ' \" and %s %n {0}", "emoji 🐈 and 中文"]
    content = "\r\n".join([hostile[0], "", hostile[1], "   ", *hostile[2:]]) + "\r\n"
    path = _prompt_sweep(tmp_path, content.encode())
    sweep, _ = read_sweep_file(path)
    prompts = resolve_prompts(sweep, base_dir=tmp_path)
    assert [p.prompt_id for p in prompts] == [0, 2, 4, 5, 6, 7, 8]
    assert [p.text for p in prompts] == hostile
    lines = content.split("\r\n")
    assert all(lines[p.prompt_id] == p.text for p in prompts)


def test_jsonl_prompts_may_hold_escaped_line_breaks_but_not_nul(tmp_path):
    ok = _prompt_sweep(tmp_path, b'{"prompt": "two\\nlines \\u2028 here"}\n\n{"prompt": "x", "tag": "t"}\n', ".jsonl")
    sweep, _ = read_sweep_file(ok)
    prompts = resolve_prompts(sweep, base_dir=tmp_path)
    assert [(p.prompt_id, p.text) for p in prompts] == [(0, "two\nlines \u2028 here"), (2, "x")]
    bad = _prompt_sweep(tmp_path, b'{"prompt": "x"}\n{"prompt": "a\\u0000b"}\n{"prompt": 3}\n', ".jsonl")
    message = _refused(bad)
    assert "p.jsonl:2: contains U+0000" in message and 'p.jsonl:3: expected an object with a non-empty string "prompt"' in message
