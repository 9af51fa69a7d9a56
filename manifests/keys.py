"""Key index → region: which token a key of the canonical sequence [image | CLIP | T5] is, and where it sits.

The one owner of the mapping from a key index (the `topk_idx` / `sink_idx` of a sink record) to a place:
- image keys: (frame, row, column) on the patch grid, frame-major then row-major (the order every supported
  transformer flattens its patches in: SD3 / PixArt / Flux / Qwen-Image / Z-Image patchify row by row; video
  transformers frame by frame), and whether the patch is a `corner`, on an `edge` or `interior`;
- text keys: the encoder segment (`clip` | `t5`; `t5` is the family's sequence text encoder: T5, Qwen2.5-VL on
  Qwen-Image, Qwen3 on Z-Image), the position within it, the token string, and whether it is
  `padding` (a slot after the prompt's last real token, whatever token fills it: the pad token, or a comma
  under comma padding, or Z-Image's learned caption pad embedding, which has no token), `special` (BOS / EOS / other tokenizer specials) or `content`.

Torch-free, so analysis (spatial sink maps) and the recorder share it: the grid of a layer follows from its
number of image keys and the generated size alone (`ImageGrid.for_tokens`), which also covers SDXL's UNet
layers at 1/8, 1/16 and 1/32 of the latent size.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.models import Geometry

IMAGE_REGIONS = ("corner", "edge", "interior")
TEXT_KINDS = ("padding", "special", "content")


@dataclass(frozen=True)
class ImageGrid:
    """The patch grid of a layer's image keys: `frames` × `rows` × `cols`, flattened frame-major, row-major."""

    rows: int
    cols: int
    frames: int = 1

    @property
    def count(self) -> int:
        return self.frames * self.rows * self.cols

    @classmethod
    def for_tokens(cls, num_image: int, height: int, width: int, frames: int = 1) -> "ImageGrid":
        """The grid of `num_image` keys over a `height` × `width` picture (same aspect ratio, `frames` frames).

        A layer that works at a coarser scale (a UNet down block) has fewer keys; the grid keeps the aspect
        ratio, with ceil-rounding as strided convolutions do.
        """
        if num_image <= 0 or num_image % frames:
            raise ValueError(f"{num_image} image keys do not split into {frames} frame(s)")
        per_frame = num_image // frames
        # patches of s × s pixels, ceil-rounded as strided convolutions round; rows·cols falls as s grows
        for side in range(1, max(height, width) + 1):
            rows, cols = -(-height // side), -(-width // side)
            if rows * cols == per_frame:
                return cls(rows=rows, cols=cols, frames=frames)
            if rows * cols < per_frame:
                break
        raise ValueError(f"{num_image} image keys do not tile a {height}×{width} picture at any patch size")

    def position(self, index: int) -> tuple[int, int, int]:
        """(frame, row, col) of image key `index`."""
        if not 0 <= index < self.count:
            raise ValueError(f"image key {index} is outside the {self.frames}×{self.rows}×{self.cols} grid")
        frame, rest = divmod(index, self.rows * self.cols)
        row, col = divmod(rest, self.cols)
        return frame, row, col

    def region(self, row: int, col: int) -> str:
        """corner | edge | interior of a patch (a 1-wide grid has no interior: all its patches are edges or corners)."""
        on_row_edge = row in (0, self.rows - 1)
        on_col_edge = col in (0, self.cols - 1)
        if on_row_edge and on_col_edge:
            return "corner"
        return "edge" if on_row_edge or on_col_edge else "interior"


def image_grid(geometry: Geometry, height: int, width: int, frames: int = 1) -> ImageGrid:
    """The transformer-level patch grid of a model at `height` × `width` (VAE scale × patch size per patch)."""
    side = geometry.vae_scale * geometry.patch_size
    return ImageGrid(rows=height // side, cols=width // side, frames=frames)


@dataclass(frozen=True)
class TextKey:
    """One text key: its encoder segment, position in it, token string (None: no token, e.g. SD3's zero T5 slots)."""

    segment: str  # "clip" | "t5"
    position: int
    token: str | None
    kind: str  # padding | special | content


def text_kind(attended: bool, special: bool) -> str:
    """A slot past the prompt's real tokens is padding (even when a comma fills it); else special or content."""
    if not attended:
        return "padding"
    return "special" if special else "content"


@dataclass(frozen=True)
class KeyRegion:
    """Where one key sits. `region` is corner | edge | interior for image keys, padding | special | content for text."""

    index: int
    modality: str  # "image" | "text"
    region: str
    frame: int | None = None
    row: int | None = None
    col: int | None = None
    segment: str | None = None
    position: int | None = None
    token: str | None = None

    @property
    def label(self) -> str:
        """e.g. "image:corner", "text:padding" (what atlas region maps count)."""
        return f"{self.modality}:{self.region}"


def key_region(index: int, num_image: int, grid: ImageGrid | None, text: tuple[TextKey, ...]) -> KeyRegion:
    """The region of key `index` in a layer with keys [image (num_image) | text keys in order]."""
    if index < 0:
        raise ValueError(f"key index {index} < 0")
    if index < num_image:
        if grid is None or grid.count != num_image:
            raise ValueError(f"image key {index}: the grid {grid} does not hold the layer's {num_image} image keys")
        frame, row, col = grid.position(index)
        return KeyRegion(index, "image", grid.region(row, col), frame=frame, row=row, col=col)
    slot = index - num_image
    if slot >= len(text):
        raise ValueError(f"key {index} is past the {num_image} image and {len(text)} text keys of this layer")
    key = text[slot]
    return KeyRegion(index, "text", key.kind, segment=key.segment, position=key.position, token=key.token)


REGION_LABELS = tuple(f"image:{r}" for r in IMAGE_REGIONS) + tuple(f"text:{k}" for k in TEXT_KINDS)
