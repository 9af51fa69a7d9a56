"""ImageReward v1.0 score of (prompt, image), batched.

The network is assembled from the image-reward package's own modules (BLIP ViT-L/16 vision
tower, BLIP "med" BERT text encoder with cross-attention, the reward MLP) under the same
parameter names as the released checkpoint, and run on whole batches. The package's ``score()``
handles one image per call. Scores follow the package: reward = (MLP(text[CLS]) − mean) / std.
The checkpoint is loaded non-strictly (it also holds unused projection heads), so every
parameter of the scoring network is checked to be present in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..weights import MissingWeightsError, find_weight, weights_dir
from .base import Metric, random_label, seeded_init

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
# ViT-L/16 at 224 px, as ImageReward builds it (BLIP create_vit("large", 224)).
VIT_LARGE = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35

# Random-weight stand-in for tests and the offline demo: same code path, tiny sizes.
TINY_VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2}
TINY_MED = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 30524,
    "max_position_embeddings": 64, "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
    "encoder_width": 48, "add_cross_attention": True,
}  # fmt: skip
# Tiny offline vocabulary for random mode (BERT special tokens first, as in bert-base-uncased).
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [p + chr(c) for p in ("", "##") for c in range(97, 123)]


def ir_cache_dir() -> Path:
    """The image-reward package's own download folder."""
    return Path.home() / ".cache" / "ImageReward"


def bert_tokenizer_dir() -> Path:
    """Folder with bert-base-uncased's vocab.txt: the sinkscope layout, else the HF cache."""
    local = weights_dir() / "imagereward" / "bert-base-uncased"
    if (local / "vocab.txt").is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        try_to_load_from_cache = None
    tried = [str(local / "vocab.txt")]
    if try_to_load_from_cache is not None:
        for repo in ("google-bert/bert-base-uncased", "bert-base-uncased"):
            hit = try_to_load_from_cache(repo, "vocab.txt")
            if isinstance(hit, str):
                return Path(hit).parent
            tried.append(f"Hugging Face cache: {repo}/vocab.txt")
    raise MissingWeightsError(
        "metric 'imagereward': the bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json) was not found. "
        f"Put the files in\n  {local}/\nor fill the Hugging Face cache (HF_HUB_OFFLINE=1 is respected; nothing is "
        "downloaded). Looked in:\n  " + "\n  ".join(tried)
    )


class ImageRewardMetric(Metric):
    name = "imagereward"
    kind = "unit"
    higher_is_better = True
    default_batch_size = 16

    def configure(self, checkpoint: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                  vit: dict[str, Any] | None = None, expected_vocab: int | None = None) -> None:  # fmt: skip
        """``checkpoint``/``med_config``/``tokenizer`` override the weight layout; ``vit`` overrides
        the vision tower sizes and ``expected_vocab`` the tokenizer size check (0 disables it);
        both only for tests with a matching checkpoint."""
        self.checkpoint = checkpoint
        self.med_config = med_config
        self.tokenizer_dir = tokenizer
        self.vit = dict(vit) if vit is not None else None
        self.expected_vocab = expected_vocab

    @property
    def backbone(self) -> str:
        if self.random_weights:
            return random_label("imagereward-blip(tiny)")
        return f"ImageReward-v1.0:{Path(self.checkpoint).name if self.checkpoint else CHECKPOINT}"

    # -- loading -----------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path, Path]:
        ckpt = Path(self.checkpoint) if self.checkpoint else find_weight(
            "imagereward", CHECKPOINT, also=[ir_cache_dir() / CHECKPOINT], what="ImageReward v1.0 checkpoint"
        )
        med = Path(self.med_config) if self.med_config else find_weight(
            "imagereward", MED_CONFIG, also=[ir_cache_dir() / MED_CONFIG], what="BLIP text-encoder config of ImageReward"
        )
        tok = Path(self.tokenizer_dir) if self.tokenizer_dir else bert_tokenizer_dir()
        for p in (ckpt, med):
            if not p.exists():
                raise MissingWeightsError(f"metric 'imagereward': {p} does not exist")
        return ckpt, med, tok

    def _load(self) -> None:
        import tempfile

        import torch

        from ._imagereward_compat import BERT_VOCAB_SIZE, load_modules, load_tokenizer

        mods = load_modules()
        if self.random_weights:
            with tempfile.TemporaryDirectory() as tmp:
                med_path = Path(tmp) / MED_CONFIG
                med_path.write_text(json.dumps(TINY_MED))
                (Path(tmp) / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
                self.tokenizer = load_tokenizer(tmp, expected_vocab=None)
                with seeded_init():
                    net = build_network(mods, med_path, self.vit or TINY_VIT)
        else:
            ckpt, med_path, tok_dir = self._paths()
            expected = self.expected_vocab if self.expected_vocab is not None else BERT_VOCAB_SIZE
            self.tokenizer = load_tokenizer(tok_dir, expected_vocab=expected or None)
            net = build_network(mods, med_path, self.vit or VIT_LARGE)
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            load_checked(net, state, ckpt)
        self.net = net.to(self.device).eval()
        self.preprocess = mods.reward._transform(self.net.image_size)

    # -- scoring ----------------------------------------------------------------------
    def score_images(self, images: list, prompts: list[str]) -> np.ndarray:
        import torch

        self.load()
        if len(images) != len(prompts):
            raise ValueError("one prompt per image is needed")
        out = np.empty(len(images), dtype=np.float64)
        for s in range(0, len(images), self.batch_size):
            ims, ps = images[s : s + self.batch_size], prompts[s : s + self.batch_size]
            pixels = torch.stack([self.preprocess(im) for im in ims]).to(self.device)
            text = self.tokenizer(
                ps, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                r = self.net(pixels, text.input_ids, text.attention_mask)
            out[s : s + len(ims)] = r.double().cpu().numpy()
        return out


def build_network(mods, med_config: Path, vit: dict[str, Any]):
    """ImageReward's scoring parts, named as in its checkpoint (``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``mlp.layers.*``)."""
    import torch
    from torch import nn

    class _Blip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual_encoder = mods.vit.VisionTransformer(**vit)
            config = mods.med.BertConfig.from_json_file(str(med_config))
            config.encoder_width = vit["embed_dim"]
            self.text_encoder = mods.med.BertModel(config=config, add_pooling_layer=False)

    class ImageRewardNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blip = _Blip()
            self.mlp = mods.reward.MLP(self.blip.text_encoder.config.hidden_size)
            self.image_size = vit["img_size"]

        def forward(self, pixels, input_ids, attention_mask):
            image_embeds = self.blip.visual_encoder(pixels)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
            hidden = self.blip.text_encoder(
                input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            ).last_hidden_state[:, 0, :]
            reward = self.mlp(hidden.float()).squeeze(-1)
            return (reward - REWARD_MEAN) / REWARD_STD

    return ImageRewardNet()


def load_checked(net, state: dict, source: Path) -> None:
    """Load non-strictly but refuse a checkpoint that lacks any parameter the scorer uses."""
    result = net.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    if missing:
        raise ValueError(
            f"{source}: checkpoint lacks {len(missing)} parameters of the ImageReward scorer "
            f"(e.g. {missing[:3]}); is it ImageReward v1.0?"
        )
