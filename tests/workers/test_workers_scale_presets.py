"""Real-scale random presets (workers.scale_presets): geometry, determinism, loading through load_pipeline.

The full 2 B-parameter model is built on the meta device (shapes only) in the fast tests; one slow test builds
it for real on the CPU in bf16 (≈ 30 s, ≈ 5 GB), and one GPU test checks the on-device build.
"""

import hashlib

import pytest
import torch

from manifests import ModelSpec
from manifests.models import PRESET_GEOMETRY, REAL_SCALE_PRESETS
from workers.scale_presets import (
    SCALE_PRESETS,
    SD3_MEDIUM_TRANSFORMER,
    SD3_MEDIUM_TRANSFORMER_PARAMS,
    ScaleSD3Config,
    build_sd3_modules,
    build_sd3_random,
)

# the same code path as the preset, at a size a test can build in a second
SMALL = ScaleSD3Config(
    transformer=dict(SD3_MEDIUM_TRANSFORMER, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=64, caption_projection_dim=16, sample_size=8, pos_embed_max_size=16),
    vae_block_out_channels=(8, 8, 16, 16), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _digest(pipe) -> str:
    h = hashlib.sha256()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for name, tensor in getattr(pipe, part).state_dict().items():
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_manifests_table_and_workers_agree_on_the_presets():
    assert set(SCALE_PRESETS) == set(REAL_SCALE_PRESETS)
    for name in SCALE_PRESETS:
        assert PRESET_GEOMETRY[name].random_weights, name
        cfg = SCALE_PRESETS[name].transformer
        assert (PRESET_GEOMETRY[name].num_layers, PRESET_GEOMETRY[name].heads) == (cfg["num_layers"], cfg["num_attention_heads"])
        assert PRESET_GEOMETRY[name].default_resolution == cfg["sample_size"] * 8


def test_the_step_benchmark_measures_the_same_transformer():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sd3_step.py"
    spec = importlib.util.spec_from_file_location("bench_sd3_step_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.SD3_MEDIUM == SD3_MEDIUM_TRANSFORMER


def test_sd3_medium_random_has_sd3_medium_shapes_on_the_meta_device():
    modules = build_sd3_modules(SCALE_PRESETS["sd3-medium-random"], "meta", torch.bfloat16)
    transformer = modules["transformer"]
    assert sum(p.numel() for p in transformer.parameters()) == SD3_MEDIUM_TRANSFORMER_PARAMS  # 2028 M
    assert len(transformer.transformer_blocks) == 24
    attn = transformer.transformer_blocks[0].attn
    assert attn.heads == 24 and attn.to_q.out_features == 24 * 64
    assert transformer.context_embedder.in_features == 4096  # 64-d CLIP ⊕ zero T5, padded to 4096 by the pipeline
    assert modules["text_encoder"].config.projection_dim + modules["text_encoder_2"].config.projection_dim == 2048
    assert tuple(modules["vae"].config.block_out_channels) == (128, 256, 512, 512)
    assert modules["vae"].config.latent_channels == 16
    for module in modules.values():
        assert {p.device.type for p in module.parameters()} == {"meta"}
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}  # created in the target dtype
    assert torch.get_default_dtype() == torch.float32  # restored


def test_same_weights_every_build_in_the_target_dtype_and_global_rng_untouched():
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    first = build_sd3_random(SMALL, "cpu", torch.bfloat16)
    assert torch.equal(torch.rand(3), before)  # the build used its own RNG
    torch.manual_seed(999)
    assert _digest(build_sd3_random(SMALL, "cpu", torch.bfloat16)) == _digest(first)
    assert _digest(build_sd3_random(SMALL, "cpu", torch.bfloat16, seed=1)) != _digest(first)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        tensors = list(getattr(first, part).state_dict().values())
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.bfloat16}, part
    assert first.text_encoder_3 is None and first.tokenizer_3 is None


def test_the_small_build_generates_through_prepare_pipeline():
    """What benchmarks/bench_worker.py --small does: a hand-built model wrapped like load_pipeline's."""
    from manifests import ArmSpec, GenerationSpec, RecordingSpec
    from workers import generate_group
    from workers.loading import prepare_pipeline

    loaded = prepare_pipeline(build_sd3_random(SMALL, "cpu", torch.float32), "sd3", random_weights=True, device="cpu",
                              dtype=torch.float32, label="small", kind="random weights")
    assert loaded.random_weights and "random weights" in loaded.description
    arms = [ArmSpec(name="base"), ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [1]})]
    results = generate_group(loaded, "a red bicycle", 3, arms, GenerationSpec(steps=2, height=64, width=64),
                             RecordingSpec(layers=[0, 1]))
    assert [r.arm for r in results] == ["base", "m1"] and results[0].image.size == (64, 64)
    assert len(results[1].sink_rows) > 0


def test_a_sweep_naming_the_preset_plans(tmp_path):
    from tests.conftest import run_cli

    sweep = tmp_path / "scale.yaml"
    sweep.write_text(
        "name: scale\nmodel: {preset: sd3-medium-random, dtype: bf16}\nprompts: {set: geneval, limit: 4}\n"
        "generation: {steps: 20}\narms:\n  - {name: baseline, intervention: null}\n  - {name: sink, intervention: fixed.m1}\n"
        "recording: {layers: [6, 12, 18]}\n"
    )
    out = run_cli("plan", str(sweep)).stdout
    assert "sd3-medium-random (random weights), 1024×1024" in out and "8 units" in out, out
    bad = tmp_path / "bad.yaml"
    bad.write_text(sweep.read_text().replace("[6, 12, 18]", "[6, 12, 24]"))
    proc = run_cli("plan", str(bad), check=False)
    assert proc.returncode != 0 and "24" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_load_pipeline_builds_sd3_medium_random_with_the_same_weights_each_time():
    from workers import load_pipeline

    spec = ModelSpec(preset="sd3-medium-random", dtype="bf16")
    loaded = load_pipeline(spec, device="cpu")
    assert loaded.random_weights and "random weights" in loaded.description, loaded.description
    assert (loaded.geometry.num_layers, loaded.geometry.heads, loaded.geometry.default_resolution) == (24, 24, 1024)
    assert loaded.geometry.text_tokens() == 333
    assert {p.dtype for p in loaded.pipe.transformer.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in loaded.pipe.transformer.buffers()} == {torch.bfloat16}
    first = _digest(loaded.pipe)
    del loaded
    assert _digest(load_pipeline(spec, device="cpu").pipe) == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sd3_medium_random_is_built_on_the_gpu_with_the_same_weights_each_time():
    from workers import load_pipeline

    spec = ModelSpec(preset="sd3-medium-random", dtype="bf16")
    torch.cuda.reset_peak_memory_stats()
    first = load_pipeline(spec, device="cuda")
    tensors = [*first.pipe.transformer.parameters(), *first.pipe.vae.parameters()]
    assert {t.device.type for t in tensors} == {"cuda"} and {t.dtype for t in tensors} == {torch.bfloat16}
    assert torch.cuda.max_memory_allocated() < 6 * 2**30  # no fp32 copy of the 2 B parameters (8 GB) on the way
    second = load_pipeline(spec, device="cuda")  # both fit: ≈ 4.3 GB each
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(first.pipe, part).state_dict(), getattr(second.pipe, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a), part
