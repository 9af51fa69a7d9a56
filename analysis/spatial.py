"""Where the sinks are: the top-k keys of the sink records placed on the image's patch grid and on the
prompt's text tokens, per layer and step window, averaged over prompts.

A key index of a sink record is in the joint order [image | CLIP | T5] (docs/design.md, "Sink record");
``topk_modality`` says which part. Image key i sits at (row, col) = divmod(i, cols) of the
transformer's patch grid (rows × cols = height/(vae·patch) × width/(vae·patch), from
``manifests.keys.image_grid``); a text key's position is its offset within its encoder's segment. Token
strings come from the prompt, tokenized as the model's pipeline does (see :func:`prompt_tokens`).

Averaging: within one prompt, each cell's share is the fraction of all top-k slots (every step of
the window, head, CFG branch, seed and rank 1..k) that fall on it; these shares are then averaged
over prompts, so every prompt weighs the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manifests.keys import image_grid

if TYPE_CHECKING:
    from .run import RunData

WINDOW_COUNT = 3  # early / middle / late thirds of the recorded steps
JOINT_FAMILIES = ("sd3", "flux", "qwen_image", "z_image")  # image and text keys in one sequence; others attend to text by cross-attention
# families whose text keys are a chat-template turn at the prompt's own length: not re-tokenized here (the recorder's
# sink_token column names them)
_UNTOKENIZED_FAMILIES = ("qwen_image", "z_image")


@dataclass
class SinkMaps:
    """Shares of top-k key slots per (layer, window) on the patch grid (``image``) and on text tokens (``text``)."""

    arm: str
    rows: int
    cols: int
    windows: list[str]
    image: pd.DataFrame  # layer, window, row, col, share
    text: pd.DataFrame  # layer, window, segment, token, share
    modality: pd.DataFrame  # layer, window, modality, share
    n_prompts: int
    notes: list[str] = field(default_factory=list)

    def grid(self, layer: int, window: str) -> np.ndarray:
        """rows × cols array of shares of one (layer, window) (0 where no key landed)."""
        out = np.zeros((self.rows, self.cols))
        sub = self.image[(self.image["layer"] == layer) & (self.image["window"] == window)]
        out[sub["row"].to_numpy(int), sub["col"].to_numpy(int)] = sub["share"].to_numpy(float)
        return out


def model_geometry(run: "RunData"):
    """The model's ``manifests.models.Geometry`` from the frozen sweep (None if unknown)."""
    try:
        from manifests.schema import ModelSpec

        return ModelSpec.model_validate(run.sweep.get("model") or {}).geometry()
    except Exception:  # an unknown or unreadable model block: no grid, the caller says so
        return None


def step_windows(steps: list[int], count: int = WINDOW_COUNT) -> dict[int, str]:
    """step → window label: the sorted recorded steps split into ``count`` near-equal consecutive runs."""
    steps = sorted(set(int(s) for s in steps))
    out = {}
    for chunk in np.array_split(np.array(steps), min(count, len(steps))) if steps else []:
        label = f"steps {chunk[0]}–{chunk[-1]}" if len(chunk) > 1 else f"step {chunk[0]}"
        out.update({int(s): label for s in chunk})
    return out


@lru_cache(maxsize=8)
def _tokenizers(model_key: str, family: str, has_clip: bool, has_t5: bool):
    """(clip, t5) tokenizers the way the pipeline built them; None where none can be had offline."""
    clip = t5 = None
    if has_clip:
        try:  # the CLIP BPE that open_clip ships (workers.tokenizer: what tiny presets use; same vocabulary as SD3/SDXL)
            from workers.tokenizer import load_clip_tokenizer

            clip = load_clip_tokenizer()
        except Exception:
            clip = None
    if has_t5 and family not in _UNTOKENIZED_FAMILIES:
        try:
            if model_key.startswith("preset:"):
                from workers.tokenizer import load_t5_tokenizer  # the tiny presets' T5 stand-in

                t5 = load_t5_tokenizer()
            else:
                from transformers import AutoTokenizer

                sub = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(family, "tokenizer")
                t5 = AutoTokenizer.from_pretrained(model_key.split(":", 1)[1], subfolder=sub, local_files_only=True)
        except Exception:
            t5 = None
    return clip, t5


def _clean(token: str) -> str:
    return token.replace("</w>", "").replace("\u2581", "") or token


def prompt_tokens(run: "RunData", prompt: str, geometry) -> dict[tuple[str, int], str]:
    """(segment, position) → token string of one prompt, for the segments whose tokenizer is available."""
    model = run.sweep.get("model") or {}
    key = f"preset:{model['preset']}" if model.get("preset") else f"hub:{model.get('hub_id') or model.get('path')}"
    # SD3 presets and load_t5: false run without T5: its slots are zero vectors, not tokens
    no_t5 = geometry.family == "sd3" and (bool(model.get("preset")) or model.get("load_t5") is False)
    clip, t5 = _tokenizers(key, geometry.family, geometry.clip_tokens > 0, geometry.t5_tokens > 0 and not no_t5)
    out: dict[tuple[str, int], str] = {}
    for segment, tok, length in (("clip", clip, geometry.clip_tokens), ("t5", t5, geometry.t5_tokens)):
        if tok is None or not length:
            continue
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True)["input_ids"]
        for pos, token in enumerate(tok.convert_ids_to_tokens(ids)):
            out[(segment, pos)] = _clean(str(token))
    return out


def _top_keys(run: "RunData", arm: str) -> pd.DataFrame:
    """One row per top-k slot: prompt_id, step, layer, idx, modality."""
    from .plots import read_sink_steps

    table = read_sink_steps(run, arm, ["unit_id", "prompt_id", "arm", "step", "layer", "topk_idx", "topk_modality"])
    table = table.filter(pc.invert(pc.is_null(table["topk_idx"])))
    if len(table) == 0:
        return pd.DataFrame(columns=["prompt_id", "step", "layer", "idx", "modality"])
    parent = pc.list_parent_indices(table["topk_idx"])
    return pa.table(
        {
            "prompt_id": pc.take(table["prompt_id"], parent),
            "step": pc.take(table["step"], parent),
            "layer": pc.take(table["layer"], parent),
            "idx": pc.list_flatten(table["topk_idx"]),
            "modality": pc.list_flatten(table["topk_modality"]),
        }
    ).to_pandas()


def _prompt_average(counts: pd.DataFrame, totals: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Σ over prompts of (count / prompt's total slots) / number of prompts with records in that (layer, window)."""
    per = counts.merge(totals, on=["prompt_id", "layer", "window"])
    per["share"] = per["count"] / per["total"]
    n = totals.groupby(["layer", "window"])["prompt_id"].nunique().rename("n_prompts")
    out = per.groupby(["layer", "window", *keys], sort=True)["share"].sum().reset_index().merge(n.reset_index())
    out["share"] = out["share"] / out["n_prompts"]
    return out.drop(columns="n_prompts")


def sink_maps(run: "RunData", arm: str | None = None, windows: int = WINDOW_COUNT) -> SinkMaps | None:
    """Where the top-k keys of ``arm`` (default: the baseline) sit; None when the run has no top-k records."""
    arm = arm or run.baseline
    keys = _top_keys(run, arm)
    if keys.empty:
        return None
    geometry = model_geometry(run)
    notes: list[str] = []
    units = run.units[run.units["arm"] == arm]
    height, width = int(units["height"].iloc[0]), int(units["width"].iloc[0])
    rows = cols = 0
    if geometry is not None:
        grid = image_grid(geometry, height, width)  # manifests.keys owns the key → patch-grid rule
        rows, cols = grid.rows, grid.cols
    window_of = step_windows(keys["step"].tolist(), windows)
    keys["window"] = keys["step"].map(window_of)
    totals = keys.groupby(["prompt_id", "layer", "window"]).size().rename("total").reset_index()

    mod = keys.groupby(["prompt_id", "layer", "window", "modality"]).size().rename("count").reset_index()
    modality = _prompt_average(mod, totals, ["modality"])

    image = keys[keys["modality"] == "image"].copy()
    joint = geometry is not None and geometry.family in JOINT_FAMILIES
    if geometry is None or not joint:
        notes.append("image keys are not placed on a grid: " + ("the model's geometry is unknown" if geometry is None
                     else f"{geometry.family} self-attention layers work at several resolutions"))  # fmt: skip
        image = image.iloc[0:0]
    outside = image["idx"] >= rows * cols
    if outside.any():
        notes.append(f"{int(outside.sum())} image key slots lie outside the {rows}×{cols} grid and are left out")
        image = image[~outside]
    image["row"], image["col"] = image["idx"] // max(cols, 1), image["idx"] % max(cols, 1)
    img_counts = image.groupby(["prompt_id", "layer", "window", "row", "col"]).size().rename("count").reset_index()
    image_share = _prompt_average(img_counts, totals, ["row", "col"])

    text = keys[keys["modality"] != "image"].copy()
    n_image = rows * cols if joint else 0
    n_clip = geometry.clip_tokens if geometry is not None else 0
    text["segment"] = np.where(text["modality"] == "clip", "clip", "t5")
    text["position"] = text["idx"] - n_image - np.where(text["segment"] == "t5", n_clip, 0)
    prompts = run.units.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    tokens = {pid: prompt_tokens(run, str(prompts.get(pid, "")), geometry) if geometry is not None else {}
              for pid in text["prompt_id"].unique()}  # fmt: skip
    if len(text) and not any(tokens.values()):
        notes.append("no tokenizer could be built offline: text keys are named by segment and position")
    empty_t5 = geometry is not None and geometry.family == "sd3"  # SD3 without T5: zero vectors in the T5 slots
    labels = []
    for pid, seg, pos, mod_name in zip(text["prompt_id"], text["segment"], text["position"], text["modality"]):
        token = tokens[pid].get((seg, int(pos)))
        if mod_name == "t5_pad" and empty_t5 and token is None:
            token = "(empty T5 slot)"
        labels.append(f"{token if token is not None else '?'} ({seg} {pos})")
    text["token"] = labels
    txt_counts = text.groupby(["prompt_id", "layer", "window", "segment", "token"]).size().rename("count").reset_index()
    text_share = _prompt_average(txt_counts, totals, ["segment", "token"])
    order = list(dict.fromkeys(window_of[s] for s in sorted(window_of)))
    return SinkMaps(arm, rows, cols, order, image_share, text_share, modality, int(keys["prompt_id"].nunique()), notes)
