"""Where metric weights are looked up. Nothing here downloads.

One layout, rooted at ``$SINKSCOPE_WEIGHTS_DIR`` (default ``~/.cache/sinkscope/weights``)::

    lpips/alexnet-owt-7be5be79.pth          torchvision AlexNet (IMAGENET1K_V1) trunk for LPIPS
    clip_t/<arch>-<tag>.pt                  open_clip checkpoint, default ViT-B-32-openai.pt
    imagereward/ImageReward.pt              ImageReward v1.0 checkpoint
    imagereward/med_config.json             its BLIP text-encoder config
    imagereward/bert-base-uncased/          tokenizer files (vocab.txt, tokenizer_config.json)
    hpsv2/HPS_v2.1_compressed.pt            HPS v2.1 (HPS_v2_compressed.pt for v2.0)
    fid_shift/inception-2015-12-05.pt       clean-fid's TorchScript InceptionV3

Each metric also accepts the usual cache of its library (listed in the error message).
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "SINKSCOPE_WEIGHTS_DIR"


class MissingWeightsError(FileNotFoundError):
    """A metric's weight file is absent; the message names it and where to put it."""


def weights_dir() -> Path:
    """Root of the sinkscope weight layout."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sinkscope" / "weights"


def find_weight(metric: str, relpath: str, *, also: list[Path] | tuple[Path, ...] = (), what: str = "") -> Path:
    """First existing of ``$SINKSCOPE_WEIGHTS_DIR/<metric>/<relpath>`` and the ``also`` paths.

    Raises :class:`MissingWeightsError` naming every place looked at.
    """
    primary = weights_dir() / metric / relpath
    candidates = [primary, *[Path(p) for p in also]]
    for path in candidates:
        if path.exists():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    desc = f" ({what})" if what else ""
    raise MissingWeightsError(
        f"metric {metric!r}: weight file {relpath!r}{desc} not found. Put it at\n  {primary}\n"
        f"(set ${WEIGHTS_ENV} to change the root; see docs/analysis.md). Looked in:\n  {looked}\n"
        "Nothing is downloaded. To exercise the code without weights use random_weights=True "
        "(scores are then labelled random and are not the metric)."
    )


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` as torch resolves it (default ~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        return Path(torch_home).expanduser() / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "torch" / "hub" / "checkpoints"
