"""Shared open_clip scorer: cosine between L2-normalised image and text embeddings.

CLIP-T and HPS v2 are the same computation on different weights (HPS v2 is a fine-tuned
OpenCLIP ViT-H-14; its score is the diagonal of normalised image·text, like hpsv2.score).
Raw cosine: no ×100 and no clamp at 0 (unlike torchmetrics' CLIPScore).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..weights import MissingWeightsError, find_weight
from .base import Metric, random_label, seeded_init

# A tiny CLIP for random-weight runs: same tokenizer (open_clip's bundled BPE, 77 tokens),
# same code path, seconds to build on a CPU.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def hf_cached_file(repo: str, filenames: tuple[str, ...]) -> Path | None:
    """A file of a Hub repo if it already is in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for name in filenames:
        hit = try_to_load_from_cache(repo.strip("/"), name)
        if isinstance(hit, str):
            return Path(hit)
    return None


class OpenClipCosine(Metric):
    """Base for open_clip cosine metrics. Subclasses say where the checkpoint comes from."""

    kind = "unit"
    higher_is_better = True
    default_batch_size = 32
    default_arch: str = "ViT-B-32"

    def configure(self, arch: str | None = None, checkpoint: str | None = None, precision: str = "fp32",
                  **extra: Any) -> None:  # fmt: skip
        """``arch``: open_clip model name (or ``local-dir:<folder>`` with open_clip_config.json and
        weights). ``checkpoint``: explicit weight file. ``precision``: fp32 (default) or amp (CUDA)."""
        if precision not in ("fp32", "amp"):
            raise ValueError(f"precision must be 'fp32' or 'amp', got {precision!r}")
        self.arch = arch
        self.checkpoint = checkpoint
        self.precision = precision
        self.configure_extra(**extra)

    def configure_extra(self, **extra: Any) -> None:
        if extra:
            raise TypeError(f"metric {self.name!r}: unknown options {sorted(extra)}")

    # subclasses
    def resolve_checkpoint(self) -> Path:
        raise NotImplementedError

    def weights_label(self) -> str:
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def backbone(self) -> str:
        if self.random_weights:
            return random_label(f"open_clip:{self.arch or 'tiny-clip'}")
        return f"open_clip:{self.arch or self.default_arch}:{self.weights_label()}"

    def _load(self) -> None:
        import open_clip

        if self.random_weights:
            with seeded_init():
                if self.arch is None:
                    model = open_clip.CLIP(**TINY_CLIP_CFG)
                    size = TINY_CLIP_CFG["vision_cfg"]["image_size"]
                    preprocess = open_clip.image_transform(size, is_train=False)
                    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
                else:
                    model, _, preprocess = open_clip.create_model_and_transforms(self.arch, pretrained=None)
                    tokenizer = open_clip.get_tokenizer(self.arch)
        else:
            arch = self.arch or self.default_arch
            if arch.startswith("local-dir:"):
                folder = Path(arch.split(":", 1)[1])
                if not (folder / "open_clip_config.json").is_file():
                    raise MissingWeightsError(f"metric {self.name!r}: {folder}/open_clip_config.json not found")
                model, _, preprocess = open_clip.create_model_and_transforms(arch, require_pretrained=True)
            else:
                ckpt = Path(self.checkpoint) if self.checkpoint else self.resolve_checkpoint()
                if not ckpt.exists():
                    raise MissingWeightsError(f"metric {self.name!r}: checkpoint {ckpt} does not exist")
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=str(ckpt), **self.model_kwargs()
                )
            tokenizer = open_clip.get_tokenizer(arch)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def score_images(self, images: list, prompts: list[str]) -> np.ndarray:
        import contextlib

        import torch

        self.load()
        if len(images) != len(prompts):
            raise ValueError("one prompt per image is needed")
        amp = (
            torch.autocast("cuda") if self.precision == "amp" and str(self.device).startswith("cuda")
            else contextlib.nullcontext()
        )  # fmt: skip
        out = np.empty(len(images), dtype=np.float64)
        for s in range(0, len(images), self.batch_size):
            ims, ps = images[s : s + self.batch_size], prompts[s : s + self.batch_size]
            pixels = torch.stack([self.preprocess(im) for im in ims]).to(self.device)
            tokens = self.tokenizer(ps).to(self.device)
            with torch.inference_mode(), amp:
                img = self.model.encode_image(pixels, normalize=True)
                txt = self.model.encode_text(tokens, normalize=True)
            out[s : s + len(ims)] = (img.float() * txt.float()).sum(-1).double().cpu().numpy()
        return out


def find_open_clip_checkpoint(metric: str, arch: str, tag: str) -> Path:
    """``$SINKSCOPE_WEIGHTS_DIR/<metric>/<arch>-<tag>.{safetensors,bin,pt}``, else the Hugging
    Face cache of the repo open_clip names for (arch, tag)."""
    import open_clip

    stem = f"{arch}-{tag}"
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    also: list[Path] = []
    repo = cfg.get("hf_hub")
    if repo:
        hit = hf_cached_file(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        if hit is not None:
            return hit
        also.append(Path(f"<Hugging Face cache>/{repo.strip('/')}/open_clip_model.safetensors"))
    for ext in ("safetensors", "bin"):
        try:
            return find_weight(metric, f"{stem}.{ext}")
        except MissingWeightsError:
            pass
    return find_weight(metric, f"{stem}.pt", also=also, what=f"open_clip {arch} weights '{tag}' (.safetensors/.bin/.pt)")
