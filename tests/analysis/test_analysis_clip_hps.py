"""CLIP-T and HPS v2 through open_clip, with a tiny random CLIP built offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import MissingWeightsError, compute_metrics, load_run
from analysis.metrics.clip_t import ClipTMetric
from analysis.metrics.hpsv2 import HPSv2Metric


def _images(n, size=48):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red cube", "two dogs on grass", "a photo of a cat", "an orange", "a blue car"]


def _register_tiny_arch(folder, name: str) -> None:
    """Make open_clip know the tiny random architecture under `name`, as a real one is known by its name."""
    import json

    import open_clip

    from analysis.metrics._openclip import TINY_CLIP_CFG

    cfg_file = folder / f"{name}.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_file)


@pytest.fixture(scope="module")
def random_clip():
    return ClipTMetric(random_weights=True, device="cpu", batch_size=2).load()


def test_clip_t_is_raw_cosine_of_normalised_embeddings(random_clip):
    imgs = _images(5)
    got = random_clip.score_images(imgs, PROMPTS)  # batches of 2, 2, 1
    m = random_clip.model
    with torch.no_grad():
        for img, prompt, value in zip(imgs, PROMPTS, got):
            i = m.encode_image(random_clip.preprocess(img)[None])[0]
            t = m.encode_text(random_clip.tokenizer([prompt]))[0]
            cos = float(i @ t / (i.norm() * t.norm()))
            assert value == pytest.approx(cos, abs=1e-6)
    assert np.all(np.abs(got) <= 1) and len(set(np.round(got, 6))) > 1  # not clamped, not ×100
    assert "RANDOM-INIT" in random_clip.backbone


def test_clip_t_local_checkpoint_round_trip(random_clip, tmp_path):
    # register the tiny architecture under a name, save the random weights as a "real" checkpoint
    _register_tiny_arch(tmp_path, "sinkscope-test-tiny")
    target = tmp_path / "weights" / "clip_t" / "sinkscope-test-tiny-openai.pt"
    target.parent.mkdir(parents=True)
    torch.save(random_clip.model.state_dict(), target)
    loaded = ClipTMetric(device="cpu", arch="sinkscope-test-tiny")
    assert loaded.backbone == "open_clip:sinkscope-test-tiny:openai"
    imgs = _images(3)
    np.testing.assert_allclose(loaded.score_images(imgs, PROMPTS[:3]), random_clip.score_images(imgs, PROMPTS[:3]),
                               rtol=1e-6)  # fmt: skip
    # an incomplete checkpoint is refused (open_clip loads strictly)
    state = random_clip.model.state_dict()
    state.pop("text_projection")
    torch.save(state, target)
    with pytest.raises(RuntimeError, match="text_projection"):
        ClipTMetric(device="cpu", arch="sinkscope-test-tiny").load()


def test_clip_t_local_dir_backbone(random_clip, tmp_path):
    import json

    from analysis.metrics._openclip import TINY_CLIP_CFG

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    torch.save(random_clip.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    metric = ClipTMetric(device="cpu", arch=f"local-dir:{folder}")
    imgs = _images(2)
    np.testing.assert_allclose(metric.score_images(imgs, PROMPTS[:2]), random_clip.score_images(imgs, PROMPTS[:2]),
                               rtol=1e-6)  # fmt: skip


def test_clip_t_missing_weights_message():
    with pytest.raises(MissingWeightsError) as err:
        ClipTMetric(device="cpu").load()
    msg = str(err.value)
    assert "ViT-B-32-openai.pt" in msg and "clip_t" in msg and "timm/vit_base_patch32_clip_224.openai" in msg


def test_hps_checkpoint_names_and_versions(tmp_path):
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt"):
        HPSv2Metric(device="cpu").load()
    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt"):
        HPSv2Metric(device="cpu", version="v2.0").load()
    with pytest.raises(ValueError, match="v2.1"):
        HPSv2Metric(device="cpu", version="v3")
    with pytest.raises(TypeError, match="unknown options"):
        ClipTMetric(device="cpu", versoin="v2.1")


def test_hps_loads_state_dict_checkpoint_format(random_clip, tmp_path):
    _register_tiny_arch(tmp_path, "sinkscope-test-tiny-h")
    # HPS releases store {"state_dict": ...}; and the file sits in the documented layout
    target = tmp_path / "weights" / "hpsv2" / "HPS_v2.1_compressed.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": random_clip.model.state_dict()}, target)
    hps = HPSv2Metric(device="cpu", arch="sinkscope-test-tiny-h")
    assert "HPSv2.1" in hps.backbone and "RANDOM" not in hps.backbone
    imgs = _images(2)
    np.testing.assert_allclose(hps.score_images(imgs, PROMPTS[:2]), random_clip.score_images(imgs, PROMPTS[:2]),
                               rtol=1e-6)  # fmt: skip


def test_clip_t_and_hps_as_jobs(fake_run):
    run_dir = fake_run(n_prompts=2, n_seeds=1, prompts_per_shard=1)
    out = compute_metrics(run_dir, ["clip_t", "hpsv2"], random_weights=True)
    assert len(out) == 4
    run = load_run(run_dir)
    for name in ("clip_t", "hpsv2"):
        rows = run.metrics[run.metrics["metric"] == name]
        # unit metrics score every unit, baseline included
        assert set(rows["unit_id"]) == set(run.units["unit_id"])
        assert rows["random_weights"].all() and rows["value"].between(-1, 1).all()
    # the prompt of each unit is used: recompute one row directly
    row = run.metrics[(run.metrics["metric"] == "clip_t")].iloc[0]
    unit = run.units.set_index("unit_id").loc[row["unit_id"]]
    direct = ClipTMetric(random_weights=True, device="cpu").score_images([run.image(row["unit_id"])], [unit["prompt"]])
    assert direct[0] == pytest.approx(row["value"], abs=1e-6)
