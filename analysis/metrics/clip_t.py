"""CLIP-T: raw cosine between the L2-normalised CLIP image and prompt embeddings.

Default backbone: OpenAI CLIP ViT-B/32 through open_clip (``ViT-B-32`` + tag ``openai``, built
with QuickGELU as those weights need), fp32, as the paper's main tables. Another backbone:
``options={"clip_t": {"arch": "ViT-L-14", "tag": "openai"}}`` or ``{"checkpoint": path}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._openclip import OpenClipCosine, find_open_clip_checkpoint


class ClipTMetric(OpenClipCosine):
    name = "clip_t"
    default_arch = "ViT-B-32"

    def configure_extra(self, tag: str = "openai") -> None:
        self.tag = tag

    def weights_label(self) -> str:
        return Path(self.checkpoint).name if self.checkpoint else self.tag

    def resolve_checkpoint(self) -> Path:
        return find_open_clip_checkpoint(self.name, self.arch or self.default_arch, self.tag)

    def model_kwargs(self) -> dict[str, Any]:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(self.arch or self.default_arch, self.tag) or {}
        kwargs: dict[str, Any] = {}
        if cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        for key in ("mean", "std"):
            if cfg.get(key) is not None:
                kwargs[f"image_{key}"] = cfg[key]
        return kwargs
