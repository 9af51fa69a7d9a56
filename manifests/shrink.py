"""A shrunken copy of any sweep: same arms and structure on a tiny random model, two prompts, two steps.

Used by `orchestrate submit --smoke` (check a sweep end to end in a minute before spending GPU hours)
and by the tests that run every sweep of the paper catalogue. Layer indices are mapped proportionally
onto the tiny model's blocks; everything that makes the sweep what it is (arms, windows, k) is kept.
"""

from __future__ import annotations

import copy

from manifests.models import PRESET_GEOMETRY

TINY_FOR_FAMILY = {"sd3": "tiny-sd3-deep", "sdxl": "tiny-sdxl", "flux": "tiny-flux", "pixart": "tiny-pixart",
                   "qwen_image": "tiny-qwen-image", "z_image": "tiny-z-image", "wan": "tiny-wan", "ltx": "tiny-ltx-video"}
# models whose architecture differs within their family: SD3.5's dual-attention `.attn2`, PixArt-α's pipeline
TINY_FOR_HUB = {
    "stabilityai/stable-diffusion-3.5-medium": "tiny-sd35",
    "stabilityai/stable-diffusion-3.5-large": "tiny-sd35",
    "PixArt-alpha/PixArt-XL-2-1024-MS": "tiny-pixart-alpha",
}


def _map_layer(layer, source_layers: int, target_layers: int):
    if not isinstance(layer, int):
        return layer  # a name pattern stays a pattern
    return min(layer * target_layers // max(source_layers, 1), target_layers - 1)


def _map_layers(layers: list, source_layers: int, target_layers: int) -> list:
    mapped = []
    for layer in layers:
        value = _map_layer(layer, source_layers, target_layers)
        if value not in mapped:
            mapped.append(value)
    return mapped


def shrink(data: dict, family: str, source_layers: int, prompts: int = 2, steps: int = 2) -> dict:
    """`data` is a sweep mapping (as read from YAML); returns a new mapping for the tiny model of `family`."""
    preset = TINY_FOR_HUB.get((data.get("model") or {}).get("hub_id"), TINY_FOR_FAMILY.get(family))
    if preset is None or preset not in PRESET_GEOMETRY:
        raise ValueError(f"no tiny model for the {family!r} family yet; cannot shrink this sweep")
    target_layers = PRESET_GEOMETRY[preset].num_layers
    out = copy.deepcopy(data)
    out["name"] = f"{data['name']}-smoke"
    out["model"] = {"preset": preset}
    source = dict(data["prompts"])
    source.pop("limit", None), source.pop("ids", None), source.pop("start", None)
    out["prompts"] = {**source, "limit": prompts}
    out["seeds"] = {**data.get("seeds", {}), "count": 1}
    generation = dict(data.get("generation", {}))
    generation.update(steps=min(generation.get("steps", 20), steps), height=64, width=64)
    if PRESET_GEOMETRY[preset].is_video:  # the tiny model's own few frames (a valid count for its VAE)
        generation["num_frames"] = PRESET_GEOMETRY[preset].default_frames
    out["generation"] = generation
    recording = dict(data.get("recording", {}))
    if "layers" in recording:
        mapped = _map_layers(list(recording["layers"]), source_layers, target_layers)  # integers first, then patterns
        recording["layers"] = sorted(mapped, key=lambda layer: (isinstance(layer, str), layer if isinstance(layer, int) else 0, str(layer)))
    out["recording"] = recording
    for arm in out["arms"]:
        iv = arm.get("intervention")
        if isinstance(iv, dict) and "layers" in iv:
            iv["layers"] = _map_layers(iv["layers"], source_layers, target_layers)
        elif isinstance(iv, str) or (isinstance(iv, dict) and "preset" in iv and "layers" not in iv):
            from manifests.interventions import resolve_preset

            name = iv if isinstance(iv, str) else iv["preset"]
            layers = _map_layers(resolve_preset(name).layers, source_layers, target_layers)
            arm["intervention"] = {**({"preset": name} if isinstance(iv, str) else iv), "layers": layers}
    out["sharding"] = {"prompts_per_shard": prompts}
    out["executor"] = {"kind": "local"}
    out["analysis"] = {**data.get("analysis", {}), "random_metric_weights": True}
    return out
