"""Sink identification: incoming key mass per (batch, head), and the key selections of the intervention family.

Incoming mass m[b,h,j] = mean over a range of queries of softmax(q·kᵀ·scale)[j]. It is computed in query
chunks in fp32 (never a full fp32 queries × keys matrix per layer) by `workers.kernels.key_mass_stats`
(a fused Triton kernel on CUDA).

Selections return key indices per head, `[H, n]` int64, in diffusers' joint key order [image | text].
Random selections draw from a CPU `torch.Generator` seeded from (unit seed, offset, step, layer, branch),
so the same unit picks the same keys on any device, and no two (step, layer, branch) share a stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from manifests.interventions import Intervention
from workers.kernels import KeyMassStats, key_mass_stats  # Triton on CUDA, chunked fp32 elsewhere

__all__ = ["KeyMassStats", "key_mass_stats", "KeyLayout", "rank_keys", "select_keys", "selection_seed"]


@dataclass(frozen=True)
class KeyLayout:
    """Where each modality sits in the key sequence [image | CLIP | T5], and how the queries split.

    Joint attention (SD3) has the same sequence for queries and keys; cross-attention (SDXL attn2) has
    image queries and CLIP keys, so `query_image` / `query_text` default to the key counts but may differ.
    """

    num_image: int
    num_clip: int
    num_t5: int
    query_image: int | None = None
    query_text: int | None = None

    @property
    def num_text(self) -> int:
        return self.num_clip + self.num_t5

    @property
    def num_keys(self) -> int:
        return self.num_image + self.num_text

    def query_range(self, scope: str) -> tuple[int, int]:
        """[start, end) of the image / text / all query rows (may be empty, e.g. text rows of a self-attention)."""
        n_image = self.num_image if self.query_image is None else self.query_image
        n_text = self.num_text if self.query_text is None else self.query_text
        if scope == "image":
            return 0, n_image
        if scope == "text":
            return n_image, n_image + n_text
        if scope == "all":
            return 0, n_image + n_text
        raise ValueError(f"unknown query scope {scope!r}")

    def restricted(self, kept: list[int]) -> "KeyLayout":
        """The layout of the keys `kept` (ascending indices into this layout's keys), the query split unchanged."""
        image = sum(1 for j in kept if j < self.num_image)
        clip = sum(1 for j in kept if self.num_image <= j < self.num_image + self.num_clip)
        return KeyLayout(num_image=image, num_clip=clip, num_t5=len(kept) - image - clip,
                         query_image=self.query_image, query_text=self.query_text)

    def eligible(self, which: str, device=None) -> torch.Tensor:
        """Boolean [K] mask of the keys a selection may pick."""
        mask = torch.zeros(self.num_keys, dtype=torch.bool, device=device)
        start, end = {"all": (0, self.num_keys), "image": (0, self.num_image), "text": (self.num_image, self.num_keys)}[which]
        mask[start:end] = True
        return mask

    def to_joint_order(self, indices: list[int], key_order: str) -> list[int]:
        """Map static indices given in `key_order` to diffusers' [image | text] order."""
        out = []
        for index in indices:
            if not 0 <= index < self.num_keys:
                raise ValueError(f"static key index {index} is outside the {self.num_keys} keys of this layer")
            if key_order == "text_image":  # paper M3: [text | image], so 0 = first text token (CLIP BOS)
                out.append(self.num_image + index if index < self.num_text else index - self.num_text)
            else:
                out.append(index)
        return out


def rank_keys(values: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Indices of the `count` largest (smallest) values along the last dim; ties go to the lower index.

    Exact ties are common (SD3 without T5 has 256 identical zero T5 keys; CLIP padding repeats), and
    `torch.topk` breaks them differently per device and k, so selections and records use a stable sort.
    """
    # Same result as `torch.sort(values, descending=largest, stable=True).indices[..., :count]`, at the
    # cost of a top-k: each value's float32 bits are mapped to an int32 with the same order and packed
    # with its (reversed, for largest) index into one int64, so all keys are distinct and ordered as the
    # stable sort orders them. A segmented sort per recorded call was a measurable part of a step.
    if values.dtype == torch.float64:  # the packing below orders float32 values only
        return torch.sort(values, dim=-1, descending=largest, stable=True).indices[..., :count]
    v = values.to(torch.float32) + 0.0  # -0.0 -> +0.0: they compare equal, so they must tie
    bits = v.contiguous().view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    index = torch.arange(v.shape[-1], device=v.device, dtype=torch.int64)
    packed = (ordered << 32) | ((0xFFFFFFFF - index) if largest else index)
    return torch.topk(packed, count, dim=-1, largest=largest, sorted=True).indices


def selection_seed(unit_seed: int, offset: int, step: int, layer: str, branch: str, purpose: str = "select") -> int:
    """A 63-bit seed unique to (unit, offset, step, layer, branch, purpose): no collisions across prompts or calls."""
    text = f"{unit_seed}|{offset}|{step}|{layer}|{branch}|{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _uniform_per_head(candidates: torch.Tensor, heads: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct keys per head drawn uniformly from `candidates` [n] (a random permutation per head)."""
    if count > candidates.numel():
        raise ValueError(f"cannot draw {count} keys from {candidates.numel()} eligible keys")
    order = torch.rand(heads, candidates.numel(), generator=generator).argsort(dim=-1)[:, :count]
    return candidates[order]


def select_keys(
    iv: Intervention,
    layout: KeyLayout,
    mass: torch.Tensor | None,
    heads: int,
    generator_seed: int | None = None,
) -> torch.Tensor:
    """Keys to act on for one batch element: [H, n] int64, distinct within each head.

    `mass` is that element's incoming mass [H, K] (needed by the mass-based selections and
    modality_random); mass-based selections stay on its device (no host sync). `generator_seed` seeds
    the random selections, which are drawn on the CPU.
    """
    sel = iv.selection
    num_eligible = {"all": layout.num_keys, "image": layout.num_image, "text": layout.num_text}[iv.eligible_keys]
    budget = iv.k * heads if sel in ("union_topk", "union_bottomk", "random_union") else iv.k
    if sel != "static" and budget > num_eligible:
        raise ValueError(f"selection={sel} with k={iv.k} needs {budget} keys, which exceeds the {num_eligible} eligible ({iv.eligible_keys}) keys")
    if sel == "static":
        joint = layout.to_joint_order(list(iv.indices or []), iv.key_order)
        if len(set(joint)) != len(joint):
            raise ValueError(f"static indices {iv.indices} name the same key twice")
        eligible = layout.eligible(iv.eligible_keys)
        bad = [j for j in joint if not eligible[j]]
        if bad:
            raise ValueError(f"static keys {bad} (joint order) are not among the eligible {iv.eligible_keys!r} keys")
        return torch.tensor(joint, dtype=torch.long).expand(heads, -1).clone()
    if sel in ("random", "random_union", "modality_random"):
        if generator_seed is None:
            raise ValueError(f"selection={sel} needs a generator seed")
        generator = torch.Generator("cpu").manual_seed(generator_seed)
        candidates = layout.eligible(iv.eligible_keys).nonzero().squeeze(1)
    if sel == "random":
        return _uniform_per_head(candidates, heads, iv.k, generator)
    if sel == "random_union":
        return _uniform_per_head(candidates, 1, budget, generator).expand(heads, -1).clone()
    if mass is None:
        raise ValueError(f"selection={sel} needs the incoming mass")
    largest = sel in ("topk", "union_topk", "modality_random")
    eligible = layout.eligible(iv.eligible_keys, device=mass.device)
    masked = mass.detach().float().masked_fill(~eligible, float("-inf") if largest else float("inf"))
    if sel in ("topk", "bottomk"):
        return rank_keys(masked, iv.k, largest)
    if sel == "modality_random":
        # Same modality mix as top-k, drawn uniformly within each modality (a modality-matched random control).
        n_image_per_head = (rank_keys(masked, iv.k) < layout.num_image).sum(dim=-1).tolist()
        image_pool = candidates[candidates < layout.num_image]
        text_pool = candidates[candidates >= layout.num_image]
        rows = []
        for n_image in n_image_per_head:
            picks = [_uniform_per_head(image_pool, 1, n_image, generator)[0]] if n_image else []
            if iv.k - n_image:
                picks.append(_uniform_per_head(text_pool, 1, iv.k - n_image, generator)[0])
            rows.append(torch.cat(picks))
        return torch.stack(rows)
    # union_topk / union_bottomk: head-averaged mass, k·H keys shared by every head (paper M2).
    return rank_keys(masked.mean(dim=0), budget, largest).expand(heads, -1).clone()
