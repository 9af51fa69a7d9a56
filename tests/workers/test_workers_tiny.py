import hashlib

import pytest
import torch

from workers.tiny import TINY_PRESETS, build_tiny_pipeline


def _weights_digest(pipe) -> str:
    h = hashlib.sha256()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for name, tensor in getattr(pipe, part).state_dict().items():
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_weights_every_build_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = _weights_digest(build_tiny_pipeline("tiny-sd3"))
    assert torch.equal(torch.rand(3), before)  # the build used its own RNG
    torch.manual_seed(999)  # a different global state must not matter
    assert _weights_digest(build_tiny_pipeline("tiny-sd3")) == first


def test_presets_have_their_geometry():
    deep = build_tiny_pipeline("tiny-sd3-deep")
    assert deep.transformer.config.num_layers == 4 and deep.transformer.config.num_attention_heads == 4
    assert deep.transformer.config.attention_head_dim == 8
    assert deep.default_sample_size * deep.vae_scale_factor == 64
    assert deep.text_encoder_3 is None and deep.tokenizer_3 is None
    assert set(TINY_PRESETS) >= {"tiny-sd3", "tiny-sd3-deep"}
    with pytest.raises(ValueError, match="unknown tiny preset"):
        build_tiny_pipeline("tiny-nope")
