from open_clip.tokenizer import SimpleTokenizer

from workers.tokenizer import clip_tokenizer_dir, load_clip_tokenizer

TEXTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A DSLR photo of a corgi, 4k, trending on artstation!!",
    "naïve café — 日本語 ok? <tags> & 'quotes' \"double\"   spaces\ttabs",
    "a photo of three   red apples and a blue-green teapot; 12:30pm",
    "",
]


def test_ids_match_open_clip_token_for_token():
    ours = load_clip_tokenizer()
    ref = SimpleTokenizer()
    for text in TEXTS:
        expected = [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]
        assert ours(text)["input_ids"] == expected, text
    assert len(ours) == 49408


def test_padding_and_truncation_like_sd3():
    tok1 = load_clip_tokenizer()
    tok2 = load_clip_tokenizer(pad_token="!")
    ids1 = tok1("a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids2 = tok2("a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids1) == len(ids2) == 77
    assert ids1[-1] == 49407  # <|endoftext|>
    assert ids2[-1] == tok2.convert_tokens_to_ids("!") == 0
    long = tok1("cat " * 200, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    first = clip_tokenizer_dir()
    stamp = (first / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_dir() == first and (first / "vocab.json").stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path and not [p for p in first.parent.iterdir() if p.name.startswith(".")]
