"""Video DiTs: Wan 2.1 (two CFG calls per step, 3-D RoPE over frames × patches), stored as frame strips."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from jobs import runformat as rf
from manifests import ArmSpec, GenerationSpec, ModelSpec, RecordingSpec, parse_sweep
from manifests.load import SweepError
from manifests.models import PRESET_GEOMETRY
from manifests.shrink import shrink
from workers import generate_group, load_pipeline
from workers.generate import initial_latents, supports_prefix
from workers.tiny import build_tiny_pipeline

PROMPT = "a photo of a cat and a dog"
GEN = GenerationSpec(steps=2, guidance=5.0, num_frames=5, max_sequence_length=24)
FRAMES, ROWS, COLS = 2, 4, 4  # tiny-wan at 64 px, 5 frames: 2 latent frames of 4 × 4 patches


@pytest.fixture(scope="module")
def tiny_wan(_private_cache):
    return load_pipeline(ModelSpec(preset="tiny-wan"), device="cpu")


def _naive_place(index: int) -> tuple[int, int, int, str]:
    """(frame, row, col, region) of an image key, region from the number of in-grid 4-neighbours."""
    frame, row, col = index // (ROWS * COLS), (index % (ROWS * COLS)) // COLS, index % COLS
    neighbours = sum(0 <= row + dr < ROWS and 0 <= col + dc < COLS for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
    return frame, row, col, "image:" + {2: "corner", 3: "edge", 4: "interior"}[neighbours]


def test_wan_noop_is_stock_and_records_frames_rows_cols(tiny_wan):
    assert tiny_wan.family == "wan" and (tiny_wan.geometry.num_layers, tiny_wan.geometry.heads) == (2, 4)
    assert [(i.name, i.layer_id) for i in tiny_wan.layers] == [
        ("blocks.0.attn1", 2), ("blocks.0.attn2", 0), ("blocks.1.attn1", 3), ("blocks.1.attn2", 1),
    ]
    latents = initial_latents(tiny_wan, 5, 64, 64, 5)
    assert latents.shape == (1, 16, FRAMES, 8, 8)
    stock = build_tiny_pipeline("tiny-wan")  # diffusers' own processors, built independently
    video = stock(PROMPT, latents=latents.clone(), num_frames=5, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
                  max_sequence_length=24, output_type="pil").frames[0]
    rec = RecordingSpec(layers=[0, 1, "blocks.*.attn1"], topk=3, stats=["mass", "ratio"], branches=["cond", "uncond"])
    base = generate_group(tiny_wan, PROMPT, 5, [ArmSpec(name="base")], GEN, rec)[0]
    assert rf.strip_frames(base.image) == 5
    assert np.array_equal(np.asarray(base.image), np.asarray(rf.frame_strip(video)))  # bit-exact, every frame
    rows = base.sink_rows.to_pandas()
    assert len(rows) == 2 * 4 * 4 * 2  # steps × modules × heads × both CFG calls
    image = rows[rows.layer_name.str.endswith("attn1")]
    assert (image.sink_idx < FRAMES * ROWS * COLS).all() and set(image.sink_frame) <= {0, 1}
    for idx, frame, row, col, region in image[["sink_idx", "sink_frame", "sink_row", "sink_col", "sink_region"]].itertuples(index=False):
        assert (frame, row, col, region) == _naive_place(idx)
    text = rows[rows.layer_name.str.endswith("attn2")]
    assert text.sink_segment.eq("t5").all() and text.sink_frame.isna().all() and (text.sink_position < 24).all()


def test_wan_image_key_order_is_the_rope_position(tiny_wan):
    """Key j of a self-attention layer carries the rotary phases of (frame, row, col) = its atlas place."""
    rope = tiny_wan.denoiser.rope
    cos, _ = rope(torch.zeros(1, 16, FRAMES, 2 * ROWS, 2 * COLS))
    bands = np.cumsum([0, rope.t_dim, rope.h_dim, rope.w_dim])
    for j in range(FRAMES * ROWS * COLS):
        frame, row, col, _ = _naive_place(j)
        for band, position in enumerate((frame, row, col)):
            lo, hi = bands[band], bands[band + 1]
            assert torch.equal(cos[0, j, 0, lo:hi], rope.freqs_cos[position, lo:hi])


def test_wan_two_cfg_calls_map_rows_to_arms(tiny_wan):
    """WanPipeline calls the transformer for cond, then uncond: a batch of arms keeps each arm's rows and branch."""
    rec = RecordingSpec(layers=[0, "blocks.*.attn1"], topk=2, branches=["cond", "uncond"])
    arms = [ArmSpec(name="base"),
            ArmSpec(name="cond_self", intervention={"selection": "topk", "k": 1, "layers": ["blocks.0.attn1"], "mass_queries": "all",
                                                    "query_scope": "all", "score_op": "remove", "cfg_branch": "cond"}),
            ArmSpec(name="uncond_cross", intervention={"selection": "topk", "k": 2, "layers": [0], "mass_queries": "all",
                                                       "query_scope": "all", "score_op": "remove", "cfg_branch": "uncond"})]
    one = generate_group(tiny_wan, PROMPT, 3, arms, GEN, rec)
    two = [one[0], *generate_group(tiny_wan, PROMPT, 3, arms[1:], GEN.model_copy(update={"arms_per_batch": 2}), rec)]  # one call
    expected = {"cond_self": ("cond", "blocks.0.attn1"), "uncond_cross": ("uncond", "blocks.0.attn2")}
    for x, y in zip(one, two):
        assert np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)).max() <= 1
        for result in (x, y):
            rows = result.sink_rows.to_pandas()
            hit = rows[rows.intervened]
            if x.arm == "base":
                assert hit.empty
            else:
                assert set(zip(hit.branch, hit.layer_name)) == {expected[x.arm]} and len(hit) == 2 * 4  # 2 steps × 4 heads
        if x.arm != "base":
            assert [list(s) for s in x.sink_rows.to_pandas().query("intervened").selected_idx] == \
                   [list(s) for s in y.sink_rows.to_pandas().query("intervened").selected_idx]
            assert not np.array_equal(np.asarray(x.image), np.asarray(one[0].image))  # the intervention changes the video


def test_num_frames_is_validated_early():
    def sweep(model, frames):
        return {"name": "v", "model": model, "prompts": {"set": "geneval", "limit": 1}, "generation": {"num_frames": frames},
                "arms": [{"name": "base"}]}

    with pytest.raises(SweepError, match=r"generation\.num_frames: 6 is not 4k\+1.*1, 5, 9"):
        parse_sweep(sweep({"preset": "tiny-wan"}, 6))
    with pytest.raises(SweepError, match=r"generation\.num_frames: 5 frames, but sd3 generates still images"):
        parse_sweep(sweep({"preset": "tiny-sd3"}, 5))
    assert parse_sweep(sweep({"hub_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}, 33)).generation.num_frames == 33


def test_frame_strip_png_round_trip_and_scored_frame():
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(5)]
    png = rf.png_bytes(rf.frame_strip(frames))
    with Image.open(io.BytesIO(png)) as strip:
        assert strip.size == (40, 6) and rf.strip_frames(strip) == 5
        assert np.array_equal(np.asarray(rf.scored_frame(strip)), np.asarray(frames[2]))  # the middle frame
    still = Image.new("RGB", (8, 6), (1, 2, 3))
    plain = io.BytesIO()
    still.save(plain, format="PNG")
    assert rf.png_bytes(still) == plain.getvalue()  # a still image's file is unchanged by the rule
    with Image.open(io.BytesIO(rf.png_bytes(still))) as opened:
        assert rf.strip_frames(opened) == 1 and rf.scored_frame(opened) is opened


def test_shrink_gives_video_sweeps_the_tiny_frame_count():
    raw = {"name": "a", "model": {"hub_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}, "prompts": {"set": "geneval"},
           "generation": {"num_frames": 81, "height": 480, "width": 832}, "arms": [{"name": "base"}],
           "recording": {"layers": [29, "blocks.*.attn1"]}}
    small = shrink(raw, "wan", 30)
    assert small["model"] == {"preset": "tiny-wan"} and small["generation"]["num_frames"] == PRESET_GEOMETRY["tiny-wan"].default_frames
    assert small["recording"]["layers"] == [1, "blocks.*.attn1"]
    parse_sweep(small)


def test_wan_run_writes_frame_strips_and_scores_a_frame(tmp_path):
    """The example sweep through the real worker: strips on disk, per-frame key places in sink_steps, LPIPS on one frame."""
    from orchestrate.cli import app

    data = yaml.safe_load((Path(__file__).parents[2] / "manifests" / "examples" / "wan_tiny.yaml").read_text())
    data.update(output_root=str(tmp_path / "runs"), prompts={"set": "geneval-balanced-100", "limit": 1})
    data["arms"] = data["arms"][:2]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(tmp_path / "s.yaml")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    units = pd.read_parquet(run_dir / "tables" / "units")
    assert (units.width == 5 * 64).all() and (units.height == 64).all() and units.random_weights.all()
    for rel in units.image_path:
        with Image.open(run_dir / rel) as im:
            assert rf.strip_frames(im) == 5
    steps = pd.read_parquet(run_dir / "tables" / "sink_steps")
    assert set(steps.sink_frame.dropna()) <= {0, 1} and steps[steps.sink_frame.notna()].sink_region.str.startswith("image:").all()
    analysed = runner.invoke(app, ["analyze", str(run_dir)])
    assert analysed.exit_code == 0, analysed.output
    from analysis.run import load_run

    metrics = load_run(run_dir).metrics
    assert len(metrics) == 1 and metrics.value.iloc[0] > 0  # the intervened arm's LPIPS to the baseline, on its middle frame


# --- LTX-Video -------------------------------------------------------------------------------------------

LTX_GEN = GenerationSpec(steps=2, guidance=3.0, num_frames=9, max_sequence_length=24)
LTX_SIDE = 8  # tiny-ltx-video at 64 px, 9 frames: 2 latent frames of 8 × 8 patches


@pytest.fixture(scope="module")
def tiny_ltx(_private_cache):
    return load_pipeline(ModelSpec(preset="tiny-ltx-video"), device="cpu")


def test_ltx_noop_is_stock_and_padding_is_never_a_sink(tiny_ltx):
    assert tiny_ltx.family == "ltx" and [(i.name, i.layer_id) for i in tiny_ltx.layers][:2] == [
        ("transformer_blocks.0.attn1", 2), ("transformer_blocks.0.attn2", 0)]
    latents = initial_latents(tiny_ltx, 4, 64, 64, 9)
    assert latents.shape == (1, FRAMES * LTX_SIDE * LTX_SIDE, 16)  # packed into tokens
    stock = build_tiny_pipeline("tiny-ltx-video")
    video = stock(PROMPT, latents=latents.clone(), num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                  max_sequence_length=24, output_type="pil").frames[0]
    rec = RecordingSpec(layers=[0, 1, "transformer_blocks.*.attn1"], topk=3, branches=["cond", "uncond"])
    base = generate_group(tiny_ltx, PROMPT, 4, [ArmSpec(name="base")], LTX_GEN, rec)[0]
    assert np.array_equal(np.asarray(base.image), np.asarray(rf.frame_strip(video)))  # bit-exact, every frame
    rows = base.sink_rows.to_pandas()
    real = sum(tiny_ltx.pipe.tokenizer(PROMPT, max_length=24, padding="max_length", truncation=True).attention_mask)
    assert 0 < real < 24
    cross = rows[rows.layer_name.str.endswith("attn2")]
    for branch, attended in (("cond", real), ("uncond", 1)):  # the "" prompt attends to its EOS only
        part = cross[cross.branch == branch]
        assert len(part) and (part.sink_position < attended).all() and (part.sink_region != "text:padding").all()
        assert all(j < attended for idx in part.topk_idx for j in idx)  # masked padding is never ranked
    image = rows[rows.layer_name.str.endswith("attn1")]
    assert (image.sink_frame < FRAMES).all() and (image.sink_row < LTX_SIDE).all() and (image.sink_col < LTX_SIDE).all()
    for idx, frame, row, col in image[["sink_idx", "sink_frame", "sink_row", "sink_col"]].itertuples(index=False):
        assert (frame, row, col) == (idx // LTX_SIDE**2, idx % LTX_SIDE**2 // LTX_SIDE, idx % LTX_SIDE)


def test_ltx_token_order_is_frame_row_col(tiny_ltx):
    """LTXPipeline's packing and LTX's RoPE coordinates both put latent (frame, row, col) at key index f·R·C + r·C + c."""
    cells = torch.arange(FRAMES * LTX_SIDE * LTX_SIDE, dtype=torch.float32).view(1, 1, FRAMES, LTX_SIDE, LTX_SIDE)
    packed = tiny_ltx.pipe._pack_latents(cells, 1, 1)
    assert torch.equal(packed.flatten(), torch.arange(FRAMES * LTX_SIDE * LTX_SIDE, dtype=torch.float32))
    coords = tiny_ltx.denoiser.rope._prepare_video_coords(1, FRAMES, LTX_SIDE, LTX_SIDE, None, "cpu")[0]
    expected = [(j // LTX_SIDE**2, j % LTX_SIDE**2 // LTX_SIDE, j % LTX_SIDE) for j in range(len(coords))]
    assert [tuple(int(x) for x in c) for c in coords] == expected


def test_ltx_interventions_change_the_video_and_prefix_sharing_is_exact(tiny_ltx):
    rec = RecordingSpec(layers=[1, "transformer_blocks.1.attn1"], topk=2)
    arms = [ArmSpec(name="base"),
            ArmSpec(name="cross", intervention={"selection": "topk", "k": 1, "layers": [1], "mass_queries": "all",
                                                "query_scope": "all", "score_op": "remove", "cfg_branch": "cond"}),
            ArmSpec(name="late", intervention={"preset": "fixed.random", "layers": ["transformer_blocks.1.attn1"], "k": 2,
                                               "step_window": {"start": 0.5, "end": 1.0}})]
    shared = generate_group(tiny_ltx, PROMPT, 6, arms, LTX_GEN, rec)
    alone = generate_group(tiny_ltx, PROMPT, 6, arms, LTX_GEN.model_copy(update={"prefix_sharing": False}), rec)
    assert [r.start_step for r in shared] == [0, 0, 1]
    for x, y in zip(shared, alone):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.sink_rows.equals(y.sink_rows)
    for arm in shared[1:]:
        assert not np.array_equal(np.asarray(arm.image), np.asarray(shared[0].image))
        assert arm.sink_rows.to_pandas().intervened.any()


def test_wan_zeroes_padding_so_comma_padding_changes_nothing(tiny_wan):
    """docs/interventions.md: WanPipeline zeroes the embeddings past the last real token, whatever token filled them."""
    arms = [ArmSpec(name="base"), ArmSpec(name="comma", intervention="prompt.comma_padding")]
    base, comma = generate_group(tiny_wan, PROMPT, 1, arms, GEN, RecordingSpec())
    assert np.array_equal(np.asarray(base.image), np.asarray(comma.image))


def test_plan_estimate_counts_every_latent_frame():
    from manifests import read_sweep_file
    from orchestrate.estimate import step_and_decode_seconds

    path = Path(__file__).parents[2] / "manifests" / "atlas" / "wan21_t2v_1_3b.yaml"
    sweep = read_sweep_file(path)[0]
    single = sweep.model_copy(update={"generation": sweep.generation.model_copy(update={"num_frames": 1})})
    geo = sweep.model.geometry()
    (step, decode, _), (step1, decode1, _) = step_and_decode_seconds(sweep), step_and_decode_seconds(single)
    assert step / step1 == pytest.approx(geo.total_tokens(480, 832, 33) / geo.total_tokens(480, 832))
    assert geo.total_tokens(480, 832, 33) == 9 * 30 * 52 + 512 and decode / decode1 == pytest.approx(33)


def test_wan_prefix_sharing_with_flow_euler_is_exact(tiny_wan):
    """Wan's default UniPC is multistep (no prefix); under flow_euler a late arm starts from the baseline's latents,
    its two CFG calls a step still counted as one step."""
    arms = [ArmSpec(name="base"), ArmSpec(name="late", intervention={"preset": "fixed.random", "layers": ["blocks.1.attn1"], "k": 2,
                                                                     "step_window": {"start": 0.5, "end": 1.0}})]
    gen, rec = GEN.model_copy(update={"scheduler": "flow_euler"}), RecordingSpec(layers=[0], branches=["cond", "uncond"])
    shared = generate_group(tiny_wan, PROMPT, 2, arms, gen, rec)
    alone = generate_group(tiny_wan, PROMPT, 2, arms, gen.model_copy(update={"prefix_sharing": False}), rec)
    assert [r.start_step for r in shared] == [0, 1] and not supports_prefix(tiny_wan, GEN) and supports_prefix(tiny_wan, gen)
    for x, y in zip(shared, alone):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.sink_rows.equals(y.sink_rows)


@pytest.mark.parametrize("preset, gen", [("tiny-wan", GEN), ("tiny-ltx-video", LTX_GEN)])
def test_video_models_load_from_a_local_folder(preset, gen, tmp_path, request):
    """The loading path of a real model (pipeline class → family, geometry read from the folder's config)."""
    build_tiny_pipeline(preset).save_pretrained(tmp_path / preset)
    spec = ModelSpec(path=str(tmp_path / preset))
    assert spec.geometry().family == ("wan" if preset == "tiny-wan" else "ltx") and spec.geometry().num_layers == 2
    loaded = load_pipeline(spec, device="cpu")
    assert not loaded.random_weights and loaded.geometry.default_frames in (81, 161)  # the real pipelines' defaults
    sized = gen.model_copy(update={"height": 64, "width": 64})
    tiny = request.getfixturevalue("tiny_wan" if preset == "tiny-wan" else "tiny_ltx")
    ours = generate_group(loaded, PROMPT, 6, [ArmSpec(name="b")], sized, RecordingSpec())[0]
    want = generate_group(tiny, PROMPT, 6, [ArmSpec(name="b")], sized, RecordingSpec())[0]
    # the same weights, but read through accelerate straight from the file's memory map, where a tensor need not be
    # 64-byte aligned: CPU GEMMs then round differently in the last bit (the processors' no-op is checked against stock
    # on the same loaded modules, test_*_noop_*), so the videos agree within a pixel level or two, not bit for bit
    assert np.abs(np.asarray(ours.image, dtype=int) - np.asarray(want.image, dtype=int)).max() <= 2
