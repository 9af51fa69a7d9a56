"""Step windows (fraction, sigma, legacy gating), flow samplers, and the SD3.5 processors (QK-norm, .attn2)."""

import numpy as np
import pytest
import torch

from manifests import ArmSpec, GenerationSpec, RecordingSpec
from workers import generate_group
from workers.generate import initial_latents
from workers.tiny import build_tiny_pipeline

PROMPT = "two cats on a blue sofa"


def _intervened_steps(result) -> set[int]:
    rows = result.sink_rows.to_pandas()
    return set(rows[rows.intervened].step.tolist())


def _arm(name, **window):
    return ArmSpec(name=name, intervention={"preset": "fixed.m1", "layers": [0], "step_window": window})


def test_fraction_sigma_and_legacy_step_windows(tiny_loaded):
    gen = GenerationSpec(steps=6, guidance=5.0)
    rec = RecordingSpec(layers=[0], stats=["mass"])
    tiny_loaded.pipe.scheduler.set_timesteps(6)
    sigmas = [float(s) for s in tiny_loaded.pipe.scheduler.sigmas[:6]]
    arms = [
        _arm("late", start=0.8, end=1.0),
        _arm("early", start=0.0, end=0.34),
        _arm("late_legacy", start=0.8, end=1.0, legacy_paper_gating=True),
        _arm("sigma", sigma_min=sigmas[4] - 1e-6, sigma_max=sigmas[2] + 1e-6),
        ArmSpec(name="always", intervention={"preset": "fixed.m1", "layers": [0]}),
    ]
    late, early, legacy, by_sigma, always = generate_group(tiny_loaded, PROMPT, 5, arms, gen, rec)
    assert _intervened_steps(late) == {5}  # 5/6 ≥ 0.8: exactly the named steps
    assert _intervened_steps(early) == {0, 1, 2}
    assert _intervened_steps(legacy) == {0, 5}  # run_early_phase.py: step 0 always on, t/T = (i-1)/(N-1)
    assert _intervened_steps(by_sigma) == {2, 3, 4}
    assert _intervened_steps(always) == set(range(6))


def test_flow_samplers(tiny_loaded):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = ArmSpec(name="base")
    rec = RecordingSpec(layers=[1], stats=["mass"], branches=["cond"])
    default = generate_group(tiny_loaded, PROMPT, 8, [base], GenerationSpec(steps=4, guidance=5.0), rec)[0]
    euler = generate_group(tiny_loaded, PROMPT, 8, [base], GenerationSpec(steps=4, guidance=5.0, scheduler="flow_euler"), rec)[0]
    dpm = generate_group(tiny_loaded, PROMPT, 8, [base], GenerationSpec(steps=4, guidance=5.0, scheduler="flow_dpmpp"), rec)[0]
    assert np.array_equal(np.asarray(default.image), np.asarray(euler.image))  # SD3's default is flow Euler
    assert not np.array_equal(np.asarray(default.image), np.asarray(dpm.image))
    assert isinstance(tiny_loaded.pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # restored after the arm
    dpm_sigmas = sorted(set(dpm.sink_rows.column("sigma").to_pylist()), reverse=True)
    assert len(dpm_sigmas) == 4 and all(0 < s <= 1 for s in dpm_sigmas)  # flow sigmas, not ε-prediction VP sigmas
    from workers.generate import make_scheduler

    sched = make_scheduler(tiny_loaded.pipe, "flow_dpmpp")
    assert sched.config.prediction_type == "flow_prediction" and sched.config.use_flow_sigmas
    assert sched.config.flow_shift == tiny_loaded.pipe.scheduler.config.shift


@pytest.fixture(scope="module")
def tiny35(tiny35_loaded):
    return tiny35_loaded


def test_sd35_noop_bit_identical_and_attn2_addressable(tiny35):
    assert "transformer_blocks.0.attn2" in tiny35.attention_layers
    stock = build_tiny_pipeline("tiny-sd35")
    latents = initial_latents(tiny35, 3, 64, 64)
    expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=2, guidance_scale=5.0, output_type="pil").images[0]
    gen = GenerationSpec(steps=2, guidance=5.0)
    arms = [
        ArmSpec(name="base"),
        ArmSpec(name="self", intervention={"selection": "topk", "k": 1, "layers": ["transformer_blocks.*.attn2"], "query_scope": "all"}),
        ArmSpec(name="self_text", intervention={"selection": "topk", "k": 1, "layers": ["transformer_blocks.*.attn2"], "query_scope": "text"}),
    ]
    base, self_attn, self_text = generate_group(tiny35, PROMPT, 3, arms, gen, RecordingSpec(layers=[0, 1]))
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))
    assert not np.array_equal(np.asarray(self_attn.image), np.asarray(base.image))
    assert np.array_equal(np.asarray(self_text.image), np.asarray(base.image))  # self-attention has no text queries
    assert not self_attn.sink_rows.column("intervened").to_pylist().count(True)  # integer layers record the joint .attn only


def test_sd35_identification_uses_per_stream_qk_norm(tiny35):
    attn = tiny35.pipe.transformer.transformer_blocks[1].attn
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.append((kw["hidden_states"], kw["encoder_hidden_states"])), with_kwargs=True)
    try:
        result = generate_group(tiny35, PROMPT, 4, [ArmSpec(name="b")], GenerationSpec(steps=1, guidance=5.0), RecordingSpec(layers=[1], topk=3, stats=["mass"]))[0]
    finally:
        handle.remove()
    hidden, context = captured[0]
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    with torch.no_grad():
        q = torch.cat([attn.norm_q(split(attn.to_q(hidden))), attn.norm_added_q(split(attn.add_q_proj(context)))], 2)
        k_img, k_txt = split(attn.to_k(hidden)), split(attn.add_k_proj(context))
        right = torch.cat([attn.norm_k(k_img), attn.norm_added_k(k_txt)], 2)
        paper_bug = attn.norm_k(torch.cat([k_img, k_txt], 2))  # norm_k on the concatenation (paper-spec §5.6)

        def mass(keys):
            p = torch.softmax(q.double() @ keys.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return p[:, :, : hidden.shape[1]].mean(2)

        good, bad = mass(right), mass(paper_bug)
    rows = result.sink_rows.to_pandas()
    rows = rows[rows.branch == "cond"]
    got = np.stack([np.asarray(r) for r in rows.sort_values("head").topk_mass])
    want = np.stack([good[1, h].sort(descending=True).values[:3].numpy() for h in range(heads)])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    wrong = np.stack([bad[1, h].sort(descending=True).values[:3].numpy() for h in range(heads)])
    assert not np.allclose(got, wrong, rtol=1e-2)
