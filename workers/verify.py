"""Check a sweep's arms on the loaded model before spending a cluster on it.

`verify_sweep` runs the sweep's own generation settings on a few prompts and reports, per arm and check:

- `noop`: the sink processors, installed but with every intervention stripped and the sweep's recording on
  (plus identification at every layer some arm intervenes on), give bit-identical images and bit-identical
  denoiser outputs at every step to diffusers' stock processors, which are swapped in for a reference run of
  the same batch shape and swapped back afterwards. This is the paper's no-op claim (Table 17), tested
  against the stock attention instead of against itself (paper-spec §5.9).
- For each intervened arm, at every intervened call (layer × step × batch element) a probe receives the
  q / k / v the processor used, its selection and its output, and compares them with an explicit float64
  computation from those same q / k / v:
  - `selection`: mass-based selections pick keys whose float64 incoming mass ranks within the requested
    top / bottom k (ties within rounding accepted); random / static selections have the right count, are
    distinct and eligible (union modes: one set for every head).
  - `output`: the intervened rows equal the documented op (removal: softmax over the kept keys, renormalised;
    bias: softmax with the bias; prob_scale: η·p on the selected keys, (1 − η·P)·softmax over the rest;
    value ops on the selected value rows) within the error stock SDPA itself has against float64.
  - `mass_after`: the mass the processor's own intervention math puts on the selected keys (measured by
    running it with indicator values: v = 1 on the selected keys, 0 elsewhere) and its recorded
    `removed_mass_after` equal the analytic value: 0 for removal, the biased softmax mass for bias, η·P for
    prob_scale, P for value-only ops.
  - `scope`: rows outside the query scope and elements not intervened at that call are the stock attention
    output bit for bit.
  - `value_rows` (value ops only): the processor's value op changes exactly the selected keys' value rows,
    to the documented replacement.

Returns one dict per (arm, check): {"arm", "check", "passed", "detail"}; detail holds the numbers (max abs
error, mass after, calls checked). A plain function: `orchestrate verify` calls it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import workers.processors.common as common
from manifests.interventions import UNPADDED_FAMILIES
from manifests.schema import ArmSpec
from workers import prompt_side
from workers.generate import EncodedPrompt, check_prompt_edits, chunks, denoiser_calls_per_step, encode_prompt, initial_latents, prompt_edit, run_batch
from workers.identification import KeyLayout
from workers.loading import LoadedPipeline

_UNION = ("union_topk", "union_bottomk", "random_union")


@dataclass
class _Check:
    passed: bool = True
    calls: int = 0
    max_error: float = 0.0
    tolerance: float = 0.0
    notes: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def fail(self, note: str) -> None:
        self.passed = False
        if len(self.notes) < 3:
            self.notes.append(note)


@contextlib.contextmanager
def stock_processors(loaded: LoadedPipeline):
    """Swap diffusers' own processors in (the ones found at load time), and ours back afterwards."""
    if not loaded.stock_processors:
        raise ValueError(f"{loaded.description}: no stock processors were kept at load time")
    denoiser = loaded.denoiser
    ours = common.denoiser_processors(denoiser)
    common.set_denoiser_processors(denoiser, loaded.stock_processors)
    try:
        yield
    finally:
        common.set_denoiser_processors(denoiser, ours)


def _dtype_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _chunk_rows(heads: int, rows: int, keys: int, budget: int = 1 << 28) -> int:
    return max(1, min(rows, budget // max(1, heads * keys * 8)))


def _mass_fp64(q, k, scale, start, end, bias=None) -> torch.Tensor:
    """[H, K] float64 mean over rows [start, end) of softmax(q·kᵀ·scale (+ bias)), in row chunks."""
    heads, _, _ = q.shape
    keys = k.shape[1]
    k64 = k.double()
    total = torch.zeros(heads, keys, dtype=torch.float64, device=q.device)
    step = _chunk_rows(heads, end - start, keys)
    for r in range(start, end, step):
        s = torch.matmul(q[:, r : min(end, r + step)].double(), k64.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias[:, None, :]
        total += torch.softmax(s, dim=-1).sum(dim=1)
    return total / (end - start)


def _selection_mask(selected: torch.Tensor, keys: int) -> torch.Tensor:
    return torch.zeros(selected.shape[0], keys, dtype=torch.bool, device=selected.device).scatter_(1, selected, True)


def _reference_value(v, selected, iv, noise_seed: int) -> torch.Tensor:
    """[H, K, D] float64 value rows after the documented value op (replacement of the selected rows only)."""
    v64 = v.double().clone()
    if iv.value_op == "none":
        return v64
    heads, _, dim = v.shape
    mean = v.double().mean(dim=1)  # [H, D]
    for h in range(heads):
        sel = selected[h]
        if iv.value_op == "zero":
            v64[h, sel] = 0.0
        elif iv.value_op == "mean":
            v64[h, sel] = mean[h]
        elif iv.value_op == "lerp":
            v64[h, sel] = iv.alpha * v.double()[h, sel] + (1.0 - iv.alpha) * mean[h]
    if iv.value_op == "noise":  # N(0, σ²) from a CPU generator seeded per (element, call): docs/interventions.md
        draw = torch.randn(heads, selected.shape[-1], dim, generator=torch.Generator("cpu").manual_seed(noise_seed))
        replacement = (draw * iv.sigma).to(v.dtype).double().to(v.device)
        for h in range(heads):
            v64[h, selected[h]] = replacement[h]
    return v64


def _reference_probs(s: torch.Tensor, mask: torch.Tensor, iv) -> torch.Tensor:
    """Post-intervention probabilities from float64 logits s [H, r, K]; mask [H, K] marks the selected keys."""
    m = mask[:, None, :]
    if iv.score_op == "remove":
        return torch.softmax(s.masked_fill(m, float("-inf")), dim=-1)
    if iv.score_op == "bias":
        return torch.softmax(s + m * float(iv.bias), dim=-1)
    p0 = torch.softmax(s, dim=-1)
    if iv.score_op == "prob_scale":
        big = p0.masked_fill(~m, 0.0).sum(-1, keepdim=True)
        rest = torch.softmax(s.masked_fill(m, float("-inf")), dim=-1)  # the kept keys, renormalised
        return torch.where(m, float(iv.eta) * p0, (1.0 - float(iv.eta) * big) * rest)
    return p0


class _Verifier:
    def __init__(self, loaded: LoadedPipeline, max_query_rows: int, max_calls_per_arm: int | None):
        self.loaded = loaded
        self.max_query_rows = max_query_rows
        self.max_calls = max_calls_per_arm
        self.checks: dict[tuple[str, str], _Check] = {}
        self.calls_seen: dict[str, int] = {}
        eps = _dtype_eps(loaded.dtype)
        self.mass_tol = 4 * eps + 1e-6

    def check(self, arm: str, name: str) -> _Check:
        return self.checks.setdefault((arm, name), _Check())

    # --- the probe, called by apply_sinks inside the forward -------------------------------------------
    def __call__(self, call: common.ProbeCall) -> None:
        with torch.no_grad():
            for row, (e, plan) in enumerate(zip(call.elements, call.plans)):
                if plan.intervention is None:
                    continue
                scope = self.check(plan.arm, "scope")
                if row not in call.interventions:
                    scope.calls += 1
                    if not torch.equal(call.out[row], call.stock[row]):
                        scope.fail(f"element {e} ({plan.branch}) was not intervened at {call.layer.name} step {call.step} but its output changed")
                    continue
                seen = self.calls_seen.get(plan.arm, 0)
                self.calls_seen[plan.arm] = seen + 1
                if self.max_calls is not None and seen >= self.max_calls:
                    continue
                self._check_call(call, row, plan, scope)

    def _check_call(self, call: common.ProbeCall, row: int, plan, scope: _Check) -> None:
        iv = call.interventions[row]
        layout: KeyLayout = call.layout
        q, k, v = call.q[row], call.k[row], call.v[row]  # [H, L, D] / [H, K, D]
        heads, keys = k.shape[0], k.shape[1]
        scale = q.shape[-1] ** -0.5
        selected = call.selected[row].to(k.device)
        where = f"{call.layer.name} step {call.step} {plan.branch}"
        start, end = layout.query_range(iv.query_scope)

        # scope: rows outside [start, end) keep the stock values bit for bit
        scope.calls += 1
        outside = torch.cat([torch.arange(0, start), torch.arange(end, call.out.shape[2])]).to(k.device)
        if outside.numel() and not torch.equal(call.out[row][:, outside], call.stock[row][:, outside]):
            scope.fail(f"rows outside the {iv.query_scope} query scope changed at {where}")

        # selection
        sel_check = self.check(plan.arm, "selection")
        sel_check.calls += 1
        self._check_selection(sel_check, iv, layout, q, k, scale, selected, call, where)

        # output against float64 on (a subsample of) the in-scope rows
        out_check = self.check(plan.arm, "output")
        out_check.calls += 1
        rows = torch.arange(start, end, device=k.device)
        if rows.numel() > self.max_query_rows:
            rows = rows[torch.linspace(0, rows.numel() - 1, self.max_query_rows, device=k.device).round().long()]
        mask = _selection_mask(selected, keys)
        s = torch.matmul(q[:, rows].double(), k.double().transpose(-1, -2)) * scale
        v_ref = _reference_value(v, selected, iv, call.noise_seeds.get(row, 0))
        ref = torch.matmul(_reference_probs(s, mask, iv), v_ref)
        stock_ref = torch.matmul(torch.softmax(s, dim=-1), v.double())
        stock_err = float((call.stock[row][:, rows].double() - stock_ref).abs().max())
        err = float((call.out[row][:, rows].double() - ref).abs().max())
        scale_v = float(v_ref.abs().max())
        tol = 4 * stock_err + 4 * _dtype_eps(v.dtype) * max(scale_v, 1e-6)
        out_check.max_error = max(out_check.max_error, err)
        out_check.tolerance = max(out_check.tolerance, tol)
        if not err <= tol:
            out_check.fail(f"{where}: max |out − fp64| {err:.3g} > tol {tol:.3g}")

        # mass left on the selected keys: analytic (float64) vs the processor's math and its record
        mass_check = self.check(plan.arm, "mass_after")
        mass_check.calls += 1
        if iv.score_op == "remove":
            expected = torch.zeros(heads, dtype=torch.float64, device=k.device)
        elif iv.score_op == "bias":
            bias = mask.double() * float(iv.bias)
            expected = (_mass_fp64(q, k, scale, start, end, bias) * mask).sum(-1)
        else:
            before = (_mass_fp64(q, k, scale, start, end) * mask).sum(-1)
            expected = before * (float(iv.eta) if iv.score_op == "prob_scale" else 1.0)
        indicator = torch.zeros_like(v)
        indicator.scatter_(1, selected[:, :, None].expand(-1, -1, v.shape[-1]), 1.0)
        measured_rows, _ = common.intervened_attention(
            q[None, :, start:end], k[None], indicator[None], selected[None], iv.score_op, bias=iv.bias, eta=iv.eta
        )
        measured = measured_rows[0, :, :, 0].double().mean(dim=-1)
        recorded = call.removed_after.get(row)
        mass_check.values.append(float(measured.max()))
        errors = [float((measured - expected).abs().max())]
        if recorded is not None:
            errors.append(float((recorded.double() - expected).abs().max()))
        mass_check.max_error = max(mass_check.max_error, *errors)
        mass_check.tolerance = self.mass_tol
        if iv.score_op == "remove" and float(measured.abs().max()) != 0.0:
            mass_check.fail(f"{where}: removed keys still receive mass {float(measured.abs().max()):.3g}")
        elif max(errors) > self.mass_tol:
            mass_check.fail(f"{where}: mass after {float(measured.mean()):.4g}, expected {float(expected.mean()):.4g} (max err {max(errors):.3g})")

        if iv.value_op != "none":
            value_check = self.check(plan.arm, "value_rows")
            value_check.calls += 1
            seeds = [call.noise_seeds.get(row, 0)]
            after = common.apply_value_op(v[None], selected[None], iv.value_op, sigma=iv.sigma, alpha=iv.alpha, noise_seeds=seeds)[0]
            untouched = ~mask[:, :, None].expand_as(v)
            if not torch.equal(after[untouched], v[untouched]):
                changed = int((after != v)[untouched].sum())
                value_check.fail(f"{where}: {changed} values outside the selected keys' rows changed")
            sel_err = float((after.double() - v_ref).abs().masked_fill(untouched, 0.0).max())
            value_check.max_error = max(value_check.max_error, sel_err)
            tol = 4 * _dtype_eps(v.dtype) * max(scale_v, 1e-6)
            value_check.tolerance = tol
            if sel_err > tol:
                value_check.fail(f"{where}: selected value rows differ from the documented {iv.value_op} by {sel_err:.3g}")

    def _check_selection(self, check: _Check, iv, layout: KeyLayout, q, k, scale, selected, call, where: str) -> None:
        heads, keys = k.shape[0], k.shape[1]
        n = selected.shape[-1]
        eligible = layout.eligible(iv.eligible_keys, device=k.device)
        if iv.selection == "static":
            if call.key_index is None:
                expected = layout.to_joint_order(list(iv.indices or []), iv.key_order)
            else:  # a masked cross-attention (text keys only, so both key orders agree): indices are T5 slots
                position = {int(j): i for i, j in enumerate(call.key_index.tolist())}
                expected = [position.get(j, -1) for j in iv.indices or []]
            if any(sorted(selected[h].tolist()) != sorted(expected) for h in range(heads)):
                check.fail(f"{where}: static keys {selected[0].tolist()} ≠ {sorted(expected)}")
            return
        budget = iv.k * heads if iv.selection in _UNION else iv.k
        if n != budget:
            check.fail(f"{where}: {n} keys selected per head, expected {budget}")
            return
        if any(len(set(selected[h].tolist())) != n for h in range(heads)):
            check.fail(f"{where}: a head selected the same key twice")
        if not bool(eligible[selected].all()):
            check.fail(f"{where}: selected keys outside the eligible {iv.eligible_keys!r} keys")
        if iv.selection in _UNION and any(sorted(selected[h].tolist()) != sorted(selected[0].tolist()) for h in range(heads)):
            check.fail(f"{where}: a union selection differs between heads")
        if iv.selection not in common.MASS_SELECTIONS:
            return
        start, end = layout.query_range(iv.mass_queries)
        mass = _mass_fp64(q, k, scale, start, end)  # [H, K]
        tol = 1e-4 * float(mass.max()) + 1e-9
        largest = iv.selection in ("topk", "union_topk", "modality_random")
        fill = float("-inf") if largest else float("inf")
        ranked = mass.masked_fill(~eligible, fill)
        if iv.selection in ("union_topk", "union_bottomk"):
            ranked, sel_rows = ranked.mean(dim=0, keepdim=True), selected[:1]
        else:
            ranked, sel_rows = ranked, selected
        if iv.selection == "modality_random":  # same image/text mix as the reference top-k, per head
            for h in range(heads):
                order = torch.sort(ranked[h], descending=True, stable=True)
                top, values = order.indices[: iv.k], order.values
                boundary_tied = iv.k < keys and float(values[iv.k - 1] - values[iv.k]) <= tol
                want = int((top < layout.num_image).sum())
                got = int((selected[h] < layout.num_image).sum())
                if want != got and not boundary_tied:
                    check.fail(f"{where}: head {h} picked {got} image keys, top-k has {want}")
            return
        for h in range(ranked.shape[0]):
            values = torch.sort(ranked[h], descending=largest).values
            kth = float(values[n - 1])
            chosen = ranked[h, sel_rows[h]]
            ok = bool((chosen >= kth - tol).all()) if largest else bool((chosen <= kth + tol).all())
            check.max_error = max(check.max_error, float((chosen - kth).abs().min()) if not ok else 0.0)
            if not ok:
                check.fail(f"{where}: head {h} selected keys {sel_rows[h].tolist()} outside the fp64 {'top' if largest else 'bottom'}-{n}")


def check_prompt_edit(check: _Check, loaded: LoadedPipeline, stock: EncodedPrompt, edited: EncodedPrompt, edit) -> None:
    """The edit changed exactly the text tokens it claims, per branch and encoder segment (from the encodings' logs):
    real tokens kept (up to a `max_length` truncation), padding slots as many as claimed and filled as claimed,
    segments the edit does not name untouched."""
    fills = {}
    for attribute, segment in prompt_side.KEY_SOURCES[loaded.family]:
        tokenizer = getattr(loaded.pipe, attribute, None)
        if tokenizer is not None and (edit.pad_token or edit.pad_text):
            fills[segment] = set(tokenizer.convert_ids_to_tokens(prompt_side.fill_ids(tokenizer, edit)))
    branches = [("cond", stock.text_cond, edited.text_cond)] + ([("uncond", stock.text_uncond, edited.text_uncond)] if stock.use_cfg else [])
    cond_real = {seg: sum(1 for k in stock.text_cond if k.segment == seg and k.kind != "padding") for seg in ("clip", "t5")}
    for branch, before, after in branches:
        for segment in ("clip", "t5"):
            b = [k for k in before if k.segment == segment]
            a = [k for k in after if k.segment == segment]
            if not b:
                continue
            check.calls += 1
            where = f"{branch} {segment}"
            if not edit.applies_to(segment):
                if a != b:
                    check.fail(f"{where}: changed, but the edit names only {list(edit.encoders)}")
                continue
            if all(k.token is None for k in b):  # zero slots (SD3 without T5): only a max_length changes their count
                if len(a) != (edit.max_length or len(b)):
                    check.fail(f"{where}: {len(a)} zero slots, expected {edit.max_length or len(b)}")
                continue
            if loaded.family in UNPADDED_FAMILIES:  # no tokenizer padding reaches the denoiser: max_length only truncates
                real_b = [k.token for k in b if k.kind != "padding"]
                real_a = [k.token for k in a if k.kind != "padding"]
                if real_a != real_b[: edit.max_length or len(real_b)]:
                    check.fail(f"{where}: tokens {real_a}, expected the first {edit.max_length} of {real_b}")
                continue
            length = edit.max_length or len(b)
            if edit.padding_slots is not None:
                length = min(length, cond_real[segment] + edit.padding_slots)
            if len(a) != length:
                check.fail(f"{where}: {len(a)} tokens, expected {length}")
                continue
            real = [k.token for k in b if k.kind != "padding"]
            kept = [k.token for k in a if k.kind != "padding"]
            if len(kept) == len(real) and kept != real:
                check.fail(f"{where}: real tokens changed: {real} -> {kept}")
            for old, new in zip(b, a):
                if new.kind != "padding" or old.kind != "padding":
                    continue
                expected = fills.get(segment, {old.token})
                if new.token not in expected:
                    check.fail(f"{where}: padding slot {new.position} holds {new.token!r}, expected one of {sorted(expected)}")
                    break


def _images_equal(a, b) -> tuple[bool, int]:
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return bool(np.array_equal(x, y)), int(np.abs(x - y).max()) if x.shape == y.shape else -1


def verify_sweep(
    loaded: LoadedPipeline,
    sweep,
    prompts: list,
    max_prompts: int = 2,
    *,
    max_query_rows: int = 512,
    max_calls_per_arm: int | None = None,
) -> list[dict]:
    """Run the no-op and intervention checks for every arm of `sweep` on the first `max_prompts` prompts.

    `prompts`: manifests.Prompt objects (prompt_id sets the seed as in the sweep). `max_query_rows` caps the
    query rows of the float64 output reference per call; `max_calls_per_arm` caps the intervened calls
    checked per arm (None: all).
    """
    if not prompts:
        raise ValueError("verify_sweep needs at least one prompt")
    prompt_checks = {arm.name: _Check() for arm in sweep.arms if arm.intervention is not None and arm.intervention.prompt is not None}
    gen, rec = sweep.generation, sweep.recording
    loaded.check_layers(list(sweep.arms), rec)
    check_prompt_edits(loaded, list(sweep.arms))
    verifier = _Verifier(loaded, max_query_rows, max_calls_per_arm)
    intervened_layers = [layer for arm in sweep.arms if arm.intervention is not None for layer in arm.intervention.layers]
    noop_layers = list(dict.fromkeys([*rec.layers, *intervened_layers]))
    noop_rec = rec.model_copy(update={"layers": noop_layers})
    noop: dict[str, _Check] = {arm.name: _Check() for arm in sweep.arms}
    noop_records = dict.fromkeys(noop, 0)
    for prompt in prompts[:max_prompts]:
        seed = sweep.seeds.seed(prompt.prompt_id, 0)
        encoded = encode_prompt(loaded, prompt.text, gen)
        latents = initial_latents(loaded, seed, encoded.height, encoded.width, encoded.frames)
        stock_by_size: dict[int, object] = {}
        for chunk in chunks(list(sweep.arms), gen.arms_per_batch):
            # (a) no-op: interventions stripped, recording on, vs the stock processors at the same batch shape
            stripped = [ArmSpec(name=arm.name) for arm in chunk]
            ours = run_batch(loaded, encoded, stripped, seed, latents, gen, noop_rec, capture_outputs=True)
            if len(chunk) not in stock_by_size:
                with stock_processors(loaded):
                    stock_by_size[len(chunk)] = run_batch(loaded, encoded, stripped, seed, latents, gen, None, sinks=False, capture_outputs=True)
            stock = stock_by_size[len(chunk)]
            calls = gen.steps * denoiser_calls_per_step(loaded, encoded)
            outputs_equal = len(ours.denoiser_outputs) == len(stock.denoiser_outputs) == calls and all(
                torch.equal(a, b) for a, b in zip(ours.denoiser_outputs, stock.denoiser_outputs)
            )
            worst = max((float((a - b).abs().max()) for a, b in zip(ours.denoiser_outputs, stock.denoiser_outputs)), default=math.inf)
            for i, arm in enumerate(chunk):
                check = noop[arm.name]
                check.calls += gen.steps
                same, pixel_diff = _images_equal(ours.images[i], stock.images[i])
                check.max_error = max(check.max_error, float(pixel_diff), worst)
                noop_records[arm.name] += sum(1 for r in ours.context.records if r.arm == arm.name)
                if not (same and outputs_equal):
                    check.fail(f"prompt {prompt.prompt_id}: max |Δpixel| {pixel_diff}, max |Δ denoiser output| {worst:.3g}")
            # (b) interventions, probed at every intervened call; prompt edits against the stock encoding
            edit = prompt_edit(chunk[0])
            chunk_encoded = encoded if edit is None else encode_prompt(loaded, prompt.text, gen, edit)
            if edit is not None:
                for arm in chunk:
                    check_prompt_edit(prompt_checks[arm.name], loaded, encoded, chunk_encoded, edit)
            if any(arm.intervention is not None and arm.intervention.acts_on_attention for arm in chunk):
                run_batch(loaded, chunk_encoded, chunk, seed, latents, gen, rec, probe=verifier)
    rows = []
    for arm in sweep.arms:
        check = noop[arm.name]
        detail = (
            f"images and denoiser outputs vs stock diffusers processors over {min(len(prompts), max_prompts)} prompt(s), "
            f"{check.calls} steps: max |Δpixel| {int(check.max_error) if check.passed else check.max_error}, "
            f"{noop_records[arm.name]} layer calls recorded" + ("" if check.passed else "; " + "; ".join(check.notes))
        )
        rows.append({"arm": arm.name, "check": "noop", "passed": check.passed, "detail": detail})
        if arm.intervention is None:
            continue
        if arm.name in prompt_checks:
            check = prompt_checks[arm.name]
            detail = f"{check.calls} encodings: the edit changed exactly the claimed text tokens" if check.passed else "; ".join(check.notes)
            rows.append({"arm": arm.name, "check": "prompt", "passed": check.passed and check.calls > 0, "detail": detail})
        if not arm.intervention.acts_on_attention:
            continue
        names = ["selection", "output", "mass_after", "scope"] + (["value_rows"] if arm.intervention.value_op != "none" else [])
        for name in names:
            check = verifier.checks.get((arm.name, name), _Check())
            passed = check.passed and check.calls > 0
            if check.calls == 0:
                detail = "no intervened call was observed (layers, step window or query scope select nothing)"
            elif name == "mass_after":
                detail = (f"{check.calls} calls: max mass after {max(check.values, default=0.0):.3g}, "
                          f"max |error| {check.max_error:.3g} (tol {check.tolerance:.3g})")
            elif name in ("output", "value_rows"):
                detail = f"{check.calls} calls: max |error| {check.max_error:.3g} (tol {check.tolerance:.3g})"
            else:
                detail = f"{check.calls} calls checked"
            if check.notes:
                detail += "; " + "; ".join(check.notes)
            rows.append({"arm": arm.name, "check": name, "passed": passed, "detail": detail})
    return rows
