"""The intervention family: every sink experiment of the paper is one value of `Intervention`.

An arm's intervention is data. The worker's processors read these fields and nothing else, so the
paper's variants (M1a, M1b, M2, M3, M4) are named presets below, and corrected variants sit beside them.

Semantics (per attention call = one layer at one denoising step, per batch element b and head h):
- *identification*: incoming mass m[b,h,j] = mean over the `mass_queries` of softmax(q·Kᵀ·scale)[j],
  from the same forward pass, before any change.
- *selection* picks the keys to act on, per (b, h):
    topk / bottomk          the k keys with the largest / smallest m[b,h,:]
    union_topk / union_bottomk  head-averaged mass m̄[b,j]; its k·H largest / smallest keys, same set in every head (paper M2)
    static                  the fixed key `indices` (paper M3 uses index 0 in its own [text | image] order: see `key_order`)
    random                  k keys drawn uniformly per (b, h) from the eligible keys
    random_union            k·H keys drawn uniformly per b, same set in every head (paper M2 random control)
    modality_random         per (b, h), as many image / text keys as `topk` would select, drawn uniformly within each modality
- *query_scope*: which query rows are changed (image tokens, text tokens, or all).
- *cfg_branch*: which half of the classifier-free-guidance batch is changed.
- *score_op*: remove (−inf logit), bias (add `bias` to the logit), prob_scale (p_sel ← η·p_sel, the other
  keys rescaled by (1 − η·P_sel)/(1 − P_sel): the paper's M3 definition).
- *value_op* on the selected keys' value rows: zero, mean (mean over all keys), noise (N(0, σ²)), lerp
  (α·v_sel + (1 − α)·mean).
- *step_window*: the 0-based denoising steps at which the intervention is active, as a fraction of the
  trajectory (step i of N is active iff start ≤ i/N < end, with end = 1 meaning "through the last step"),
  or a sigma range. Exactly the named steps: the paper's off-by-one gating is a preset quirk, not a default.
- *prompt* (`PromptEdit`, optional): a prompt-side change to what the text encoders see, applied to the
  tokenizer output of the conditional and the unconditional prompt alike: fill the padding slots with a chosen
  token or string (comma padding), keep at most n padding slots (0 drops them), or change the encoders'
  maximum length. It composes with the attention ops above; with score_op = value_op = none the arm is
  prompt-side only. Same seed and same initial noise as every other arm of its group.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Selection = Literal[
    "topk", "bottomk", "union_topk", "union_bottomk", "static", "random", "random_union", "modality_random"
]
Scope = Literal["image", "text", "all"]
Branch = Literal["cond", "uncond", "both"]
ScoreOp = Literal["none", "remove", "bias", "prob_scale"]
ValueOp = Literal["none", "zero", "mean", "noise", "lerp"]


class StepWindow(BaseModel):
    """Active steps, either by trajectory fraction or by sigma. Both bounds of one kind must be given."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: float | None = Field(None, ge=0.0, le=1.0, description="first active fraction of the trajectory (inclusive)")
    end: float | None = Field(None, ge=0.0, le=1.0, description="end fraction (exclusive; 1.0 = through the last step)")
    sigma_min: float | None = Field(None, ge=0.0, le=1e6)
    sigma_max: float | None = Field(None, ge=0.0, le=1e6)
    legacy_paper_gating: bool = Field(
        False,
        description="reproduce run_early_phase.py's gating: step i uses the state set after step i-1 "
        "(t/T = (i-1)/(N-1)); step 0 is always active (paper-spec §5.10). Use only in paper presets.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "StepWindow":
        by_fraction = self.start is not None or self.end is not None
        by_sigma = self.sigma_min is not None or self.sigma_max is not None
        if by_fraction == by_sigma:
            raise ValueError("give either start/end (fractions) or sigma_min/sigma_max, not both and not neither")
        if by_fraction:
            start = 0.0 if self.start is None else self.start
            end = 1.0 if self.end is None else self.end
            if end <= start:
                raise ValueError(f"end ({end}) must be greater than start ({start})")
        else:
            lo = 0.0 if self.sigma_min is None else self.sigma_min
            hi = float("inf") if self.sigma_max is None else self.sigma_max
            if hi < lo:
                raise ValueError(f"sigma_max ({hi}) must be ≥ sigma_min ({lo})")
        return self

    def active_steps(self, num_steps: int, sigmas: list[float] | None = None) -> list[int]:
        """The exact 0-based step indices this window names, for a trajectory of `num_steps` steps."""
        if self.start is not None or self.end is not None:
            start = 0.0 if self.start is None else self.start
            end = 1.0 if self.end is None else self.end
            if self.legacy_paper_gating:
                # run_early_phase.py: the flag for step i is set by the callback of step i-1 with
                # t/T = (i-1)/(N-1); the initial flag is True, so step 0 always intervenes.
                steps = [0]
                for i in range(1, num_steps):
                    frac = (i - 1) / max(num_steps - 1, 1)
                    if start <= frac <= end:
                        steps.append(i)
                return steps
            return [i for i in range(num_steps) if start <= i / num_steps < end]
        if sigmas is None:
            raise ValueError("a sigma window needs the scheduler's sigmas")
        lo = 0.0 if self.sigma_min is None else self.sigma_min
        hi = float("inf") if self.sigma_max is None else self.sigma_max
        return [i for i in range(num_steps) if lo <= sigmas[i] <= hi]


# families whose pipelines never pad the text (manifests.models.Geometry.family)
UNPADDED_FAMILIES = ("qwen_image", "z_image")


class PromptEdit(BaseModel):
    """A prompt-side change: the token ids the text encoders get (tokenizers' `max_length` calls only).

    Padding slots are the positions after the prompt's last real token (attention mask 0). The unconditional
    prompt gets the same treatment, with the same length as the conditional one so the CFG batch stays
    rectangular. The attention is untouched unless the intervention also sets an attention op.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pad_token: str | None = Field(None, min_length=1, description="fill the padding slots with this vocabulary token (e.g. ',')")
    pad_text: str | None = Field(
        None, min_length=1, description="fill the padding slots with the tokens this string tokenizes to (no specials), repeated"
    )
    padding_slots: int | None = Field(
        None, ge=0, description="keep at most this many padding slots after the conditional prompt's tokens (0: no padding)"
    )
    max_length: int | None = Field(None, ge=1, description="the text encoders' maximum length in tokens (truncate / pad to it)")
    encoders: tuple[Literal["clip", "t5"], ...] = Field(
        ("clip", "t5"), min_length=1, description="text encoders the edit applies to (clip: CLIP-L/G of SD3/SDXL/Flux; t5: T5)"
    )

    @model_validator(mode="after")
    def _something(self) -> "PromptEdit":
        if self.pad_token is not None and self.pad_text is not None:
            raise ValueError("give pad_token (one vocabulary token) or pad_text (a string), not both")
        if self.pad_token is None and self.pad_text is None and self.padding_slots is None and self.max_length is None:
            raise ValueError("a prompt edit needs pad_token, pad_text, padding_slots or max_length")
        if len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"duplicate encoders in {list(self.encoders)}")
        return self

    def applies_to(self, segment: str) -> bool:
        return segment in self.encoders

    def unsupported_reason(self, family: str) -> str | None:
        """Why this edit makes no sense on a model family (None: it does). Qwen-Image's and Z-Image's pipelines pass
        the denoiser each prompt's real tokens only: there are no tokenizer padding slots to fill or drop (Z-Image's
        own caption padding is a learned embedding, not a token), only a maximum length to truncate to."""
        if family in UNPADDED_FAMILIES:
            if self.pad_token is not None or self.pad_text is not None or self.padding_slots is not None:
                return ("pad_token / pad_text / padding_slots edit padding, but this model's pipeline encodes each prompt at "
                        "its own length without padding slots (only max_length applies: it truncates the text)")
            if not self.applies_to("t5"):
                return "this model has one text encoder, addressed as `t5` (the sequence-text segment); `encoders` leaves it out"
        return None


class Intervention(BaseModel):
    """One member of the sink-intervention family (see the module docstring for the exact semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    selection: Selection = "topk"
    k: int = Field(1, ge=1, le=1_000_000, description="keys per head (union modes: k·heads keys in all)")
    indices: list[Annotated[int, Field(ge=0, le=10_000_000)]] | None = Field(
        None, max_length=100_000, description="key indices for selection=static"
    )
    key_order: Literal["image_text", "text_image"] = Field(
        "image_text",
        description="index space of `indices`: diffusers' joint order [image | text], or the paper M3 order [text | image]",
    )
    mass_queries: Scope = Field("image", description="queries whose attention defines incoming mass")
    eligible_keys: Literal["all", "image", "text"] = Field("all", description="keys a selection may pick from")
    query_scope: Scope = Field("image", description="query rows whose attention is changed")
    cfg_branch: Branch = "both"
    layers: list[int | str] = Field(
        default_factory=lambda: [12],
        min_length=1, max_length=1000,
        description="block indices, or glob patterns on attention-module names (e.g. 'mid_block.*.attn2')",
    )
    step_window: StepWindow | None = None
    score_op: ScoreOp = "remove"
    bias: float | None = Field(
        None, ge=-1e9, le=1e9, description="additive logit bias for score_op=bias (finite, e.g. -1e4, -65000)"
    )
    eta: float | None = Field(None, ge=0.0, le=1e3, description="probability scale for score_op=prob_scale")
    value_op: ValueOp = "none"
    sigma: float = Field(0.1, gt=0.0, le=1e6, description="noise std for value_op=noise")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="lerp weight for value_op=lerp")
    random_seed_offset: int = Field(
        0, ge=-(2**62), le=2**62, description="extra offset mixed into the seed of random selections"
    )
    prompt: PromptEdit | None = Field(None, description="prompt-side edit of the text encoders' input (see PromptEdit)")

    @model_validator(mode="after")
    def _consistent(self) -> "Intervention":
        if self.selection == "static" and not self.indices:
            raise ValueError("selection=static needs `indices` (a non-empty list of key indices)")
        if self.selection != "static" and self.indices is not None:
            raise ValueError(f"`indices` is only used with selection=static, not {self.selection!r}")
        if self.score_op == "bias" and self.bias is None:
            raise ValueError("score_op=bias needs `bias` (the value added to the selected keys' logits)")
        if self.score_op == "prob_scale" and self.eta is None:
            raise ValueError("score_op=prob_scale needs `eta` (0 removes, 1 is a no-op)")
        if self.score_op == "none" and self.value_op == "none" and self.prompt is None:
            raise ValueError("score_op and value_op are both 'none' and there is no prompt edit: use `intervention: null` for a baseline arm")
        self._no_contradictions()
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layer indices in {self.layers}")
        if any(isinstance(layer, int) and layer < 0 for layer in self.layers):
            raise ValueError(f"layer indices must be ≥ 0, got {self.layers}")
        return self

    def _no_contradictions(self) -> None:
        """A field that the chosen operation ignores is a mistake (e.g. `bias` on a remove arm): say which two disagree.
        A field counts as given when it differs from its default, so a full dump of a valid intervention stays valid."""
        random = ("random", "random_union", "modality_random")
        # (field, its default, the fields that decide whether it is used: field -> values under which it is)
        rules = [
            ("bias", None, {"score_op": ("bias",)}),
            ("eta", None, {"score_op": ("prob_scale",)}),
            ("sigma", 0.1, {"value_op": ("noise",)}),
            ("alpha", 0.5, {"value_op": ("lerp",)}),
            ("key_order", "image_text", {"selection": ("static",)}),
            ("random_seed_offset", 0, {"selection": random, "value_op": ("noise",)}),
        ]
        for field, default, used_when in rules:
            value = getattr(self, field)
            if value == default or any(getattr(self, op) in values for op, values in used_when.items()):
                continue
            current = ", ".join(f"{op}={getattr(self, op)!r}" for op in used_when)
            wanted = " or ".join(f"{op}={v}" for op, values in used_when.items() for v in values)
            raise ValueError(
                f"`{field}` ({value!r}) contradicts {current}: {field} is used only with {wanted}; "
                f"remove {field} (or set it to {'null' if default is None else default!r}) or change {' / '.join(used_when)}"
            )

    @property
    def acts_on_attention(self) -> bool:
        """False for a prompt-side-only arm (score_op = value_op = none): its layers, selection and window are unused."""
        return self.score_op != "none" or self.value_op != "none"

    @property
    def keys_per_head(self) -> int:
        """Keys removed from each head (the budget to compare against an equal-budget random control)."""
        return len(self.indices or []) if self.selection == "static" else self.k

    def first_active_step(self, num_steps: int, sigmas: list[float] | None = None) -> int:
        """The first step at which this intervention can act (0 without a window). Before it, an arm computes
        exactly what the baseline computes, which prefix sharing (workers.generate) relies on. A window that
        names no step gives num_steps - 1: the arm still runs (and decodes) its last step itself. A prompt-side
        edit changes the text keys from step 0, so such an arm shares no prefix."""
        if self.step_window is None or self.prompt is not None:
            return 0
        active = self.step_window.active_steps(num_steps, sigmas)
        return min(active) if active else num_steps - 1


def _preset(**kw) -> Intervention:
    return Intervention(**kw)


# Named presets. `paper.*` reproduce paper-spec.md §0 exactly, quirks included; `fixed.*` correct them.
PRESETS: dict[str, Intervention] = {
    # M1a: per-head top-k, image-query mass, logit -1e4 mask on image AND text queries, both CFG halves (Table 2 A1).
    "paper.m1a": _preset(selection="topk", k=1, layers=[12], query_scope="all", cfg_branch="both", score_op="bias", bias=-1e4),
    # M1b: the same, image queries only (E2, E3).
    "paper.m1b": _preset(selection="topk", k=1, layers=[12], query_scope="image", cfg_branch="both", score_op="bias", bias=-1e4),
    # M2: head-averaged union of k·H keys, same set in every head, all queries, fp16 -65000 additive mask.
    "paper.m2": _preset(selection="union_topk", k=1, layers=[12], query_scope="all", cfg_branch="both", score_op="bias", bias=-65000.0),
    # M2's random control: k·H keys drawn from ALL keys (≈92 % image tokens), same set in every head.
    "paper.m2_random": _preset(selection="random_union", k=1, layers=[12], query_scope="all", cfg_branch="both", score_op="bias", bias=-65000.0),
    "paper.m2_bottom": _preset(selection="union_bottomk", k=1, layers=[12], query_scope="all", cfg_branch="both", score_op="bias", bias=-65000.0),
    # M3: static key 0 in the [text | image] order (= CLIP BOS), η prob-scale on all queries.
    "paper.m3": _preset(selection="static", indices=[0], key_order="text_image", layers=[12], query_scope="all",
                        mass_queries="all", cfg_branch="both", score_op="prob_scale", eta=0.01),
    "paper.m3_value_zero": _preset(selection="static", indices=[0], key_order="text_image", layers=[12], query_scope="all",
                                   mass_queries="all", cfg_branch="both", score_op="none", value_op="zero"),
    "paper.m3_both": _preset(selection="static", indices=[0], key_order="text_image", layers=[12], query_scope="all",
                             mass_queries="all", cfg_branch="both", score_op="prob_scale", eta=0.0, value_op="zero"),
    # M4 (SDXL mid block): per-head top-1 over all queries, -1e4 mask, every mid-block cross / self attention.
    "paper.m4_cross": _preset(selection="topk", k=1, layers=["mid_block.*.attn2"], mass_queries="all", query_scope="all", score_op="bias", bias=-1e4),
    "paper.m4_self": _preset(selection="topk", k=1, layers=["mid_block.*.attn1"], mass_queries="all", query_scope="all", score_op="bias", bias=-1e4),
    # Corrected companions.
    "fixed.m1": _preset(selection="topk", k=1, layers=[12], query_scope="image", cfg_branch="both", score_op="remove"),
    "fixed.m2": _preset(selection="union_topk", k=1, layers=[12], query_scope="all", cfg_branch="both", score_op="remove"),
    "fixed.random": _preset(selection="random", k=1, layers=[12], query_scope="image", cfg_branch="both", score_op="remove"),
    "fixed.modality_random": _preset(selection="modality_random", k=1, layers=[12], query_scope="image", cfg_branch="both", score_op="remove"),
    # Prompt-side only (the positional-encoding study's fix for FLUX's padding sink, and its controls).
    "prompt.comma_padding": _preset(score_op="none", prompt=PromptEdit(pad_token=",")),
    "prompt.drop_padding": _preset(score_op="none", prompt=PromptEdit(padding_slots=0)),
}


def resolve_preset(name: str) -> Intervention:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        from manifests.suggest import closest_key

        hint = closest_key(str(name), sorted(PRESETS))
        meant = f"; did you mean {hint!r}?" if hint else ""
        raise ValueError(f"unknown intervention preset {name!r}{meant} (known presets: {', '.join(sorted(PRESETS))})") from None
