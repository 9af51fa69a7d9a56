"""ImageReward under transformers 5: the compat shim and the batched scorer, tiny and offline."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import MissingWeightsError
from analysis.metrics import _imagereward_compat as compat
from analysis.metrics.imagereward import TINY_MED, TINY_VIT, TINY_VOCAB, ImageRewardMetric


def _images(n, size=40):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a cat", "two red apples on a table", "x", "a very long prompt " * 10]


@pytest.fixture(scope="module")
def mods():
    return compat.load_modules()


@pytest.fixture(scope="module")
def random_ir():
    return ImageRewardMetric(random_weights=True, device="cpu", batch_size=3).load()


def test_find_pruneable_heads_and_indices():
    heads, index = compat.find_pruneable_heads_and_indices([1, 3], n_heads=4, head_size=2, already_pruned_heads=set())
    assert heads == {1, 3} and index.tolist() == [0, 1, 4, 5]
    # head 2 of the original 4, after head 0 was pruned, is row 1 of the remaining 3
    heads, index = compat.find_pruneable_heads_and_indices([2], n_heads=3, head_size=2, already_pruned_heads={0})
    assert heads == {2} and index.tolist() == [0, 1, 4, 5]


def test_shim_adds_only_missing_names_and_leaves_the_package_name_alone(mods):
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    assert mu.apply_chunking_to_forward is pu.apply_chunking_to_forward
    assert mu.find_pruneable_heads_and_indices is compat.find_pruneable_heads_and_indices
    assert "ImageReward" not in sys.modules  # the package __init__ (training script) never ran
    assert mods.med.__name__.startswith(compat.ALIAS)


def test_blip_bert_is_initialised_and_masks_invert(mods, tmp_path):
    med = tmp_path / "med.json"
    med.write_text(json.dumps(TINY_MED))
    config = mods.med.BertConfig.from_json_file(str(med))
    torch.manual_seed(0)
    bert = mods.med.BertModel(config=config, add_pooling_layer=False)
    emb = bert.embeddings.word_embeddings.weight.detach()
    # _init_weights ran (normal(0, initializer_range)), not uninitialised memory
    assert torch.isfinite(emb).all() and abs(float(emb.std()) - 0.02) < 0.002
    mask = bert.invert_attention_mask(torch.tensor([[1, 1, 0]]))
    assert mask.shape == (1, 1, 1, 3)
    assert mask[0, 0, 0, :2].tolist() == [0.0, 0.0] and mask[0, 0, 0, 2] == torch.finfo(mask.dtype).min
    assert bert.get_head_mask(None, 3) == [None, None, None]


def test_tokenizer_is_resolved_explicitly(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    tok = compat.load_tokenizer(folder, expected_vocab=None)
    assert tok.convert_tokens_to_ids("[ENC]") == tok.enc_token_id == len(TINY_VOCAB) + 1
    assert tok.bos_token == "[DEC]"
    # a vocabulary that is not bert-base-uncased's is refused instead of scoring with it
    with pytest.raises(ValueError, match="expected 30522"):
        compat.load_tokenizer(folder)
    with pytest.raises(FileNotFoundError):
        compat.load_tokenizer(tmp_path / "empty")


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
        ImageRewardMetric(device="cpu").load()
    ckpt = tmp_path / "weights" / "imagereward"
    ckpt.mkdir(parents=True)
    (ckpt / "ImageReward.pt").write_bytes(b"")
    (ckpt / "med_config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="bert-base-uncased"):
        ImageRewardMetric(device="cpu").load()


def test_batched_scores_equal_the_package_score_method(mods, random_ir):
    """The package's own ImageReward.score() (one image per call) on the same modules is the oracle."""
    from torch import nn

    pkg = object.__new__(mods.reward.ImageReward)
    nn.Module.__init__(pkg)
    pkg.device = "cpu"
    pkg.blip = random_ir.net.blip
    pkg.blip.tokenizer = random_ir.tokenizer
    pkg.mlp = random_ir.net.mlp
    pkg.preprocess = random_ir.preprocess
    pkg.mean, pkg.std = 0.16717362830052426, 1.0333394966054072
    imgs = _images(4)
    batched = random_ir.score_images(imgs, PROMPTS)  # batches of 3 + 1
    with torch.no_grad():
        single = [pkg.score(p, im) for p, im in zip(PROMPTS, imgs)]
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(batched, 7))) > 1


def test_local_checkpoint_is_loaded_and_checked(random_ir, tmp_path):
    root = tmp_path / "weights" / "imagereward"
    (root / "bert-base-uncased").mkdir(parents=True)
    (root / "bert-base-uncased" / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    (root / "med_config.json").write_text(json.dumps(TINY_MED))
    state = random_ir.net.state_dict()
    state["blip.text_proj.weight"] = torch.zeros(1)  # unused extras in the release are tolerated
    torch.save(state, root / "ImageReward.pt")
    metric = ImageRewardMetric(device="cpu", vit=TINY_VIT, expected_vocab=0)
    assert metric.backbone == "ImageReward-v1.0:ImageReward.pt"
    imgs = _images(2)
    np.testing.assert_allclose(metric.score_images(imgs, PROMPTS[:2]), random_ir.score_images(imgs, PROMPTS[:2]),
                               rtol=1e-6)  # fmt: skip
    del state["mlp.layers.0.weight"]
    torch.save(state, root / "ImageReward.pt")
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        ImageRewardMetric(device="cpu", vit=TINY_VIT, expected_vocab=0).load()
