"""LPIPS (v0.1, AlexNet trunk) between an intervened image and its paired baseline image.

Full resolution, no resize, inputs scaled uint8/127.5 − 1. The linear heads ship inside the
``lpips`` wheel; the AlexNet trunk is loaded from a local file. ``lpips.LPIPS`` would call
torchvision's downloader for a pretrained trunk, so it is always built with a random trunk
(``pnet_rand=True``) and the local weights are copied in afterwards.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..weights import find_weight, torch_hub_checkpoints
from .base import Metric, random_label, seeded_init

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# torchvision AlexNet ``features`` indices of the conv layers → LPIPS slice holding them.
_SLICE_OF_LAYER = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def images_to_tensor(images: list) -> "Any":
    """PIL images (same size) → float tensor in [-1, 1], shape (B, 3, H, W)."""
    import torch

    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch differ in size: {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


class LPIPSMetric(Metric):
    name = "lpips"
    kind = "pair"
    higher_is_better = False  # larger = further from the baseline image
    default_batch_size = 4

    @property
    def backbone(self) -> str:
        trunk = random_label("alexnet") if self.random_weights else "alexnet:torchvision-IMAGENET1K_V1"
        return f"lpips-v0.1-lin+{trunk}"

    def trunk_path(self):
        """Local AlexNet trunk file (raises a clear error if absent)."""
        return find_weight(
            "lpips",
            ALEXNET_FILE,
            also=[torch_hub_checkpoints() / ALEXNET_FILE],
            what="torchvision AlexNet IMAGENET1K_V1 weights",
        )

    def _load(self) -> None:
        import lpips
        import torch

        path = None if self.random_weights else self.trunk_path()
        with seeded_init(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated"
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            mapped = {}
            for key, value in state.items():
                parts = key.split(".")
                if parts[0] == "features" and int(parts[1]) in _SLICE_OF_LAYER:
                    mapped[f"slice{_SLICE_OF_LAYER[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
            expected = set(model.net.state_dict())
            if set(mapped) != expected:
                raise ValueError(
                    f"{path}: not a torchvision AlexNet state dict (trunk keys missing: "
                    f"{sorted(expected - set(mapped))})"
                )
            model.net.load_state_dict(mapped, strict=True)
        self.model = model.to(self.device).eval()

    def score_pairs(self, images: list, references: list) -> np.ndarray:
        import torch

        if len(images) != len(references):
            raise ValueError("score_pairs needs as many references as images")
        self.load()
        out = np.empty(len(images), dtype=np.float64)
        for start in range(0, len(images), self.batch_size):
            a = images_to_tensor(images[start : start + self.batch_size])
            b = images_to_tensor(references[start : start + self.batch_size])
            if a.shape != b.shape:
                raise ValueError(f"image and baseline differ in size: {tuple(a.shape)} vs {tuple(b.shape)}")
            with torch.inference_mode():
                d = self.model(a.to(self.device), b.to(self.device))
            out[start : start + len(a)] = d.reshape(-1).double().cpu().numpy()
        return out
