"""The same guarantees on CUDA (Triton identification kernel, fp16 / bf16 SDPA). Skipped without a GPU."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manifests import ArmSpec, GenerationSpec, ModelSpec, RecordingSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = "a red bicycle leaning on a white wall"


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_cuda_noop_bit_identical_and_interventions_run(dtype):
    from workers import generate_group, load_pipeline
    from workers.generate import initial_latents
    from workers.tiny import build_tiny_pipeline

    loaded = load_pipeline(ModelSpec(preset="tiny-sd3", dtype=dtype), device="cuda")
    stock = build_tiny_pipeline("tiny-sd3").to("cuda", loaded.dtype)
    latents = initial_latents(loaded, 5, 64, 64)
    with torch.no_grad():
        expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
    arms = [ArmSpec(name="base"), ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [1]}),
            ArmSpec(name="m3", intervention={"preset": "paper.m3_both", "layers": [0]}),
            ArmSpec(name="rnd", intervention={"preset": "fixed.modality_random", "layers": [0, 1]})]
    gen = GenerationSpec(steps=3, guidance=5.0)
    results = generate_group(loaded, PROMPT, 5, arms, gen, RecordingSpec(layers=[0, 1]))
    from workers.session import ElementPlan, RunContext

    ctx = RunContext([ElementPlan("b", "uncond", None, 5), ElementPlan("b", "cond", None, 5)], RecordingSpec(layers=[0, 1]))
    loaded.session.context = ctx
    try:
        with torch.no_grad():
            ours = loaded.pipe(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
    finally:
        loaded.session.context = None
    assert torch.equal(ours, expected)
    m1 = results[1].sink_rows.to_pandas()
    assert (m1[m1.intervened].removed_mass_after == 0.0).all()
    assert not np.array_equal(np.asarray(results[0].image), np.asarray(results[1].image))
    # random draws are device-independent: same keys as on the CPU for the same unit
    cpu = load_pipeline(ModelSpec(preset="tiny-sd3"), device="cpu")
    cpu_rows = generate_group(cpu, PROMPT, 5, arms[3:], gen, RecordingSpec(layers=[0, 1]))[0].sink_rows.to_pandas()
    gpu_rows = results[3].sink_rows.to_pandas()
    if dtype == "fp32":  # same trajectory only in fp32 (the identification picks top-k, which can flip in fp16)
        assert [list(x) for x in cpu_rows[cpu_rows.step == 0].selected_idx] == [list(x) for x in gpu_rows[gpu_rows.step == 0].selected_idx]
        np.testing.assert_allclose(np.stack(cpu_rows.topk_mass), np.stack(gpu_rows.topk_mass), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_score_ops_against_fp64_reference(dtype):
    from workers.attention_ops import intervened_attention

    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 4, 300, 333, 64
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    k[:, :, 7] = 4 * q.mean(dim=2)  # a strong sink
    sel = torch.stack([torch.randperm(lk, generator=g)[:3] for _ in range(b * h)]).view(b, h, 3)
    sel[..., 0] = 7
    s = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    mask = torch.zeros(b, h, lk, dtype=torch.bool).scatter_(-1, sel, True)[:, :, None, :]
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    qc, kc, vc, sc = (x.to("cuda", dtype) for x in (q, k, v, sel))
    sc = sel.cuda()
    removed = torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(intervened_attention(qc, kc, vc, sc, "remove")[0].double().cpu(), removed, **tol)
    p = torch.softmax(s, -1)
    P = (p * mask).sum(-1, keepdim=True)
    scaled = torch.where(mask, 0.1 * p, p * (1 - 0.1 * P) / (1 - P))
    torch.testing.assert_close(intervened_attention(qc, kc, vc, sc, "prob_scale", eta=0.1)[0].double().cpu(), scaled @ v.double(), **tol)
    assert torch.equal(intervened_attention(qc, kc, vc, sc, "remove")[1].cpu(), torch.zeros(b, h))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-sd35", "tiny-sdxl", "tiny-flux", "tiny-pixart"])
def test_cuda_verify_sweep_all_families(preset, dtype):
    """workers.verify on CUDA in half precision: stock-exact no-op, fp64-checked interventions, batched arms."""
    from manifests import PromptSpec, Sweep, load_bundled_prompts
    from workers import load_pipeline
    from workers.verify import verify_sweep

    spec = ModelSpec.model_construct(preset=preset, hub_id=None, path=None, revision=None, dtype=dtype, device=None, load_t5=True)
    loaded = load_pipeline(spec, device="cuda")
    if preset == "tiny-sdxl":
        arms = [ArmSpec(name="base"), ArmSpec(name="cross", intervention="paper.m4_cross"), ArmSpec(name="self", intervention="paper.m4_self")]
    else:
        layer = "transformer_blocks.*.attn1" if preset == "tiny-pixart" else 1
        arms = [ArmSpec(name="base"), ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [0]}),
                ArmSpec(name="m2", intervention={"preset": "paper.m2", "layers": [layer]}),
                ArmSpec(name="rnd", intervention={"preset": "fixed.modality_random", "layers": [0, layer], "value_op": "noise"})]
    sweep = Sweep.model_construct(
        name="v", model=spec, prompts=PromptSpec(set="geneval", limit=1), seeds=Sweep.model_fields["seeds"].default,
        generation=GenerationSpec(steps=3, guidance=4.0, max_sequence_length=32, arms_per_batch=2), arms=arms,
        recording=RecordingSpec(layers=[0]),
    )
    rows = verify_sweep(loaded, sweep, load_bundled_prompts("geneval")[:2])
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]


_NEW_FAMILY_EXAMPLES = ("qwen_image_tiny", "z_image_tiny", "wan_tiny", "ltx_video_tiny")


@pytest.mark.parametrize("dtype", ["bf16"])
@pytest.mark.parametrize("example", _NEW_FAMILY_EXAMPLES)
def test_cuda_verify_example_sweeps_of_the_newer_families(example, dtype):
    """Qwen-Image, Z-Image, Wan 2.1, LTX-Video: their example sweep's arms pass workers.verify on CUDA in half
    precision (stock-exact no-op, fp64-checked interventions, batched arms) as on the CPU."""
    from pathlib import Path

    from manifests import read_sweep_file, resolve_prompts
    from workers import load_pipeline
    from workers.verify import verify_sweep

    path = Path(__file__).parents[2] / "manifests" / "examples" / f"{example}.yaml"
    sweep, _ = read_sweep_file(path, overrides=[f"model.dtype={dtype}"])
    loaded = load_pipeline(sweep.model, device="cuda")
    prompts = resolve_prompts(sweep, base_dir=path.parent, source=str(path))
    rows = verify_sweep(loaded, sweep, prompts, max_prompts=1)
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
