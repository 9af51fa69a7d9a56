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


def test_qwen_stand_in_has_the_chat_specials_template_and_byte_level_round_trip():
    from transformers import Qwen2Tokenizer

    from workers.tokenizer import QWEN_SPECIALS, load_qwen_tokenizer

    tok = load_qwen_tokenizer()
    assert isinstance(tok, Qwen2Tokenizer) and tok.get_vocab() == load_qwen_tokenizer().get_vocab()  # deterministic
    assert tok.pad_token == "<|endoftext|>" and set(QWEN_SPECIALS) <= set(tok.all_special_tokens)
    turn = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True)
    assert turn == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(turn).input_ids
    assert [tok.convert_ids_to_tokens(i) for i in ids if i in tok.all_special_ids] == ["<|im_start|>", "<|im_end|>", "<|im_start|>"]
    text = "Zebra #7 ünïcode — naïve"  # bytes outside the training text still round-trip (byte-level alphabet)
    assert tok.decode(tok(text).input_ids) == text
    prefix = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial " \
             "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    assert len(tok(prefix).input_ids) == 34  # QwenImagePipeline.prompt_template_encode_start_idx, as with Qwen's own tokenizer
