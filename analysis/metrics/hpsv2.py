"""HPS v2 (human preference score): OpenCLIP ViT-H-14 fine-tuned by the HPS authors; the score
is the cosine of normalised image and prompt embeddings, as ``hpsv2.score`` computes it.

Loaded strictly from a local checkpoint (``HPS_v2.1_compressed.pt``, or ``HPS_v2_compressed.pt``
with ``version="v2.0"``) with ``open_clip.create_model_and_transforms("ViT-H-14", pretrained=<file>)``;
the hpsv2 package itself is not used (it downloads a 3.9 GB backbone first and reloads the
checkpoint on every call).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..weights import find_weight
from ._openclip import OpenClipCosine

CHECKPOINTS = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}


def hps_root() -> Path:
    """hpsv2's own cache folder (``$HPS_ROOT``, default ~/.cache/hpsv2)."""
    return Path(os.environ.get("HPS_ROOT", Path.home() / ".cache" / "hpsv2")).expanduser()


class HPSv2Metric(OpenClipCosine):
    name = "hpsv2"
    default_arch = "ViT-H-14"
    default_batch_size = 16

    def configure_extra(self, version: str = "v2.1") -> None:
        if version not in CHECKPOINTS:
            raise ValueError(f"hpsv2 version must be one of {sorted(CHECKPOINTS)}, got {version!r}")
        self.version = version

    def weights_label(self) -> str:
        return f"HPS{self.version}:{Path(self.checkpoint).name if self.checkpoint else CHECKPOINTS[self.version]}"

    def resolve_checkpoint(self) -> Path:
        fname = CHECKPOINTS[self.version]
        return find_weight("hpsv2", fname, also=[hps_root() / fname], what=f"HPS {self.version} checkpoint")
