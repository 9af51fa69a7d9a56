"""Atlas measures (sink identity, region, sink-to-random ratios) against a naive float64 computation, and
prompt-side arms: they change exactly the text tokens they claim, and keep the group's seed and initial noise."""

import math

import numpy as np
import pytest
import torch

import workers.processors.common as common_processors
import workers.processors.flux as flux_processors
import workers.processors.sd3 as sd3_processors
import workers.processors.sdxl as sdxl_processors
from manifests import ArmSpec, GenerationSpec, RecordingSpec
from manifests.interventions import Intervention, PromptEdit
from workers import generate_group
from workers.generate import chunks, encode_prompt
from workers.processors.common import apply_sinks

PROMPT = "a red cat on a blue sofa"  # lower case: PixArt lower-cases prompts before tokenizing
GEN = GenerationSpec(steps=2, guidance=5.0, height=64, width=64, max_sequence_length=24)
PROCESSOR_MODULE = {"sd3": sd3_processors, "flux": flux_processors, "pixart": sdxl_processors, "sdxl": sdxl_processors}


def _spy_calls(monkeypatch, family):
    """Record the q / k / layout every processor hands to the real apply_sinks (which still runs unchanged)."""
    calls = []

    def spy(ctx, layer, q, k, v, attn_out, layout, elements=None, key_index=None, full_layout=None, lse=None):
        calls.append(dict(step=ctx.step, layer=layer.layer_id, q=q.detach().clone(), k=k.detach().clone(), layout=layout,
                          elements=list(range(q.shape[0])) if elements is None else list(elements),
                          key_index=None if key_index is None else key_index.clone(), full=full_layout or layout,
                          plans=list(ctx.elements)))
        return apply_sinks(ctx, layer, q, k, v, attn_out, layout, elements, key_index, full_layout, lse)

    monkeypatch.setattr(PROCESSOR_MODULE[family], "apply_sinks", spy)
    monkeypatch.setattr(common_processors, "apply_sinks", spy)  # masked keys: through apply_sinks_per_kept_keys
    return calls


def _naive_region(index, num_image, tokens, specials, attended):
    """Region by brute force: neighbour count on the square patch grid; text kind from the tokenizer's own output."""
    if index < num_image:
        side = math.isqrt(num_image)
        row, col = divmod(index, side)
        neighbours = sum(0 <= row + dr < side and 0 <= col + dc < side for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
        return {2: "image:corner", 3: "image:edge", 4: "image:interior"}[neighbours], row, col, None
    slot = index - num_image
    kind = "padding" if not attended[slot] else "special" if specials[slot] else "content"
    return f"text:{kind}", None, None, tokens[slot]


def _tokenizer_view(loaded, text):
    """(tokens, special?, attended?) per text key, from the family's tokenizers called directly (no capture)."""
    pipe, family = loaded.pipe, loaded.family
    if family in ("sd3", "sdxl"):
        out = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True)
        segs = [(pipe.tokenizer, out)]
    else:
        tok = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer
        segs = [(tok, tok(text, padding="max_length", max_length=GEN.max_sequence_length, truncation=True))]
    tokens, specials, attended = [], [], []
    for tok, out in segs:
        tokens += tok.convert_ids_to_tokens(out.input_ids)
        specials += [i in set(tok.all_special_ids) for i in out.input_ids]
        attended += [bool(m) for m in out.attention_mask]
    if family == "sd3":  # no T5 in the tiny SD3: its slots are zero vectors
        tokens += [None] * GEN.max_sequence_length
        specials += [False] * GEN.max_sequence_length
        attended += [False] * GEN.max_sequence_length
    return tokens, specials, attended


@pytest.mark.slow
@pytest.mark.parametrize("fixture,layers", [("tiny_loaded", [0, 1]), ("tiny_flux_loaded", [0, 3]),
                                            ("tiny_pixart_loaded", [0]), ("tiny_xl_loaded", [0, "mid_block.*.attn1"])])
def test_atlas_columns_match_a_naive_computation(request, monkeypatch, fixture, layers):
    loaded = request.getfixturevalue(fixture)
    calls = _spy_calls(monkeypatch, loaded.family)
    rec = RecordingSpec(layers=layers, stats=["mass", "ratio"], topk=3)
    (result,) = generate_group(loaded, PROMPT, 42, [ArmSpec(name="base")], GEN, rec)
    rows = result.sink_rows.to_pandas()
    assert len(rows) and rows.sink_idx.notna().all() and rows.sink_ratio.notna().all()
    views = {"cond": _tokenizer_view(loaded, PROMPT), "uncond": _tokenizer_view(loaded, "")}
    if loaded.family == "sdxl":  # SDXL zeroes the empty negative prompt: no tokens, all padding
        views["uncond"] = ([None] * 77, [False] * 77, [False] * 77)
    by_key = {(r.step, r.layer, r.branch, r.head): r for r in rows.astype(object).where(rows.notna(), None).itertuples()}
    assert len(by_key) == len(rows)
    checked = 0
    for call in calls:
        full, layout = call["full"], call["layout"]
        start, end = layout.query_range(rec.mass_queries)
        for local, e in enumerate(call["elements"]):
            plan = call["plans"][e]
            q, k = call["q"][local].double(), call["k"][local].double()
            p = torch.softmax(q[:, start:end] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            mass = p.mean(dim=1)  # [H, K_local]
            for head in range(mass.shape[0]):
                row = by_key[(call["step"], call["layer"], plan.branch, head)]
                m = mass[head].numpy()
                local_keys = list(range(len(m))) if call["key_index"] is None else call["key_index"].tolist()
                top_full = int(row.sink_idx)
                # the recorded sink is the fp64 top key (or ties with it within fp32 rounding: CLIP's padding keys)
                assert m[local_keys.index(top_full)] >= m.max() * (1 - 1e-5)
                assert row.sink_ratio == pytest.approx(m.max() / m.mean(), rel=1e-4)
                assert row.sink_ratio_median == pytest.approx(m.max() / np.sort(m)[(len(m) - 1) // 2], rel=1e-4)
                region, r, c, token = _naive_region(top_full, full.num_image, *views[plan.branch])
                assert row.sink_region == region
                if r is not None:
                    assert (row.sink_row, row.sink_col, row.sink_frame) == (r, c, 0)
                else:
                    slot = top_full - full.num_image
                    clip = 77 if loaded.family in ("sd3", "sdxl") else 0  # [CLIP | T5]: positions count within each
                    segment, position = ("clip", slot) if slot < clip else ("t5", slot - clip)
                    assert (row.sink_token, row.sink_segment, row.sink_position) == (token, segment, position)
                checked += 1
    assert checked == len(rows)


def _encoder_inputs(encoder):
    seen = []
    handle = encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).clone()),
                                               with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("fixture,encoder", [("tiny_loaded", "text_encoder"), ("tiny_flux_loaded", "text_encoder_2"),
                                             ("tiny_pixart_loaded", "text_encoder"), ("tiny_xl_loaded", "text_encoder")])
def test_prompt_edits_change_exactly_the_tokens_they_claim(request, fixture, encoder):
    loaded = request.getfixturevalue(fixture)
    module = getattr(loaded.pipe, encoder)

    def encoded_ids(edit):
        seen, handle = _encoder_inputs(module)
        try:
            encoded = encode_prompt(loaded, PROMPT, GEN, edit)
        finally:
            handle.remove()
        return seen[0][0].tolist(), encoded  # the conditional prompt's ids, as the encoder received them

    stock, base = encoded_ids(None)
    real = [key.kind != "padding" for key in base.text_cond][: len(stock)]
    n_real = sum(real)
    assert 0 < n_real < len(stock)
    tok = loaded.pipe.tokenizer_2 if loaded.family == "flux" else loaded.pipe.tokenizer
    comma = tok.get_vocab()[","]

    ids, enc = encoded_ids(PromptEdit(pad_token=","))
    assert len(ids) == len(stock)
    assert [i for i, (a, b) in enumerate(zip(ids, stock)) if a != b] == [i for i, r in enumerate(real) if not r]
    assert all(ids[i] == comma for i in range(n_real, len(ids)))
    assert [k.token for k in enc.text_cond[n_real : len(stock)]] == [","] * (len(stock) - n_real)
    assert all(k.kind == "padding" for k in enc.text_cond[n_real : len(stock)])

    ids, enc = encoded_ids(PromptEdit(padding_slots=2))
    assert ids == stock[: n_real + 2]
    if enc.use_cfg:  # the unconditional prompt is padded to the same length
        assert len(enc.text_uncond) == len(enc.text_cond)

    ids, enc = encoded_ids(PromptEdit(max_length=n_real - 2))
    assert ids[:-1] == stock[: n_real - 3] and len(ids) == n_real - 2  # truncated; the tokenizer keeps its EOS last

    ids, _ = encoded_ids(PromptEdit(pad_token=",", encoders=("t5",) if loaded.family in ("sd3", "sdxl") else ("clip",)))
    assert ids == stock  # an edit limited to the other encoder leaves this one alone


def test_prompt_arms_share_seed_and_initial_noise_and_compose(tiny_loaded):
    seen = []
    handle = tiny_loaded.pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    both = Intervention(selection="topk", k=1, layers=[1], score_op="remove", prompt=PromptEdit(pad_token=","))
    arms = [ArmSpec(name="base"), ArmSpec(name="comma", intervention="prompt.comma_padding"), ArmSpec(name="both", intervention=both)]
    try:
        results = generate_group(tiny_loaded, PROMPT, 7, arms, GEN, RecordingSpec(layers=[1], stats=["mass"]))
    finally:
        handle.remove()
    first_step = seen[:: GEN.steps]  # one pipeline call per arm (arms_per_batch 1): step 0 inputs
    assert len(first_step) == 3 and all(torch.equal(first_step[0], x) for x in first_step[1:])
    rows = {r.arm: r.sink_rows.to_pandas() for r in results}
    assert not rows["comma"].intervened.any() and rows["both"].intervened.all()
    images = [np.asarray(r.image) for r in results]
    assert not np.array_equal(images[0], images[1])  # the comma padding reaches the denoiser


def test_arms_with_different_prompt_edits_never_share_a_batch():
    edit = Intervention(score_op="none", prompt=PromptEdit(padding_slots=0))
    arms = [ArmSpec(name="a"), ArmSpec(name="b"), ArmSpec(name="c", intervention=edit), ArmSpec(name="d", intervention=edit), ArmSpec(name="e")]
    assert [[a.name for a in c] for c in chunks(arms, 4)] == [["a", "b"], ["c", "d"], ["e"]]


def test_verify_prompt_check_catches_an_edit_that_differs_from_its_claim(tiny_flux_loaded):
    from workers.verify import _Check, check_prompt_edit

    claim = PromptEdit(pad_token=",")
    stock = encode_prompt(tiny_flux_loaded, PROMPT, GEN)
    honest, wrong = _Check(), _Check()
    check_prompt_edit(honest, tiny_flux_loaded, stock, encode_prompt(tiny_flux_loaded, PROMPT, GEN, claim), claim)
    check_prompt_edit(wrong, tiny_flux_loaded, stock, encode_prompt(tiny_flux_loaded, PROMPT, GEN, PromptEdit(pad_token=".")), claim)
    assert honest.passed and honest.calls
    assert not wrong.passed and "padding slot" in wrong.notes[0]
    short = _Check()
    check_prompt_edit(short, tiny_flux_loaded, stock, encode_prompt(tiny_flux_loaded, PROMPT, GEN, PromptEdit(padding_slots=1)), claim)
    assert not short.passed and "tokens, expected" in short.notes[0]
