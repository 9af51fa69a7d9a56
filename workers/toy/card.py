"""Score the shipped toy model and write its card (card.json + MODEL_CARD.md beside the weights).

    python -m workers.toy.card [--weights DIR] [--seeds 2] [--steps 10] [--guidance 4.0]

Reads `train_card.json` (written by workers.toy.train on the training machine), generates every prompt of the
bundled `toy-geneval` set for `--seeds` seeds with the pipeline on the CPU, scores each image with toy-GenEval
(analysis.metrics.toy_geneval), checks the metric on the generator's own renders of the same prompts, and
writes both results into the card. The numbers describe a toy model trained on synthetic shapes, not SD3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from manifests.models import TOY_NOTE
from workers.toy import scenes
from workers.toy.model import TOY_PRESET, WEIGHTS_DIR, load_toy_pipeline


def evaluate(weights: Path, seeds: int, steps: int, guidance: float) -> dict:
    from analysis.metrics.toy_geneval import score_image

    records = scenes.evaluation_records()
    prompts = [r["prompt"] for r in records]
    pipe = load_toy_pipeline(weights)
    began = time.perf_counter()
    by_tag: dict[str, list[float]] = {}
    for seed in range(seeds):
        images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                      generator=torch.Generator().manual_seed(seed), output_type="pil").images
        for record, image in zip(records, images):
            by_tag.setdefault(record["tag"], []).append(score_image(image, record["prompt"]))
    seconds = time.perf_counter() - began
    # the metric on the generator's own renders of the evaluation stream (ground truth)
    truth = [scenes.scene_at(scenes.EVAL_SEED, i) for i in range(600)]
    truth_acc = float(np.mean([score_image(scenes.render(s), s.prompt) for s in truth]))
    return {
        "prompt_set": "toy-geneval", "prompts": len(prompts), "seeds": seeds, "steps": steps, "guidance": guidance,
        "images": sum(len(v) for v in by_tag.values()), "cpu_seconds_wall": round(seconds, 1),
        "toy_geneval_overall": float(np.mean([x for v in by_tag.values() for x in v])),
        "toy_geneval_by_category": {t: float(np.mean(v)) for t, v in by_tag.items()},
        "toy_geneval_on_generator_renders": truth_acc, "renders_checked": len(truth),
    }


def markdown(card: dict) -> str:
    t, v, e = card["transformer"], card["vae"], card["evaluation"]
    cats = "\n".join(f"| {tag} | {acc:.3f} |" for tag, acc in e["toy_geneval_by_category"].items())
    hashes = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in card["source_sha256"].items())
    curve = ", ".join(f"{x:.3f}" for x in t["loss_curve"][:: max(1, len(t["loss_curve"]) // 10)])
    return f"""# Model card: {card['preset']}

**{TOY_NOTE}.** SD3's architecture at toy scale (diffusers `StableDiffusion3Pipeline`: `SD3Transformer2DModel`
with joint attention, 6 blocks × 4 heads × 32; `AutoencoderKL` 64² px ↔ 16² × 4 latents; two small frozen random
CLIP text encoders; no T5), trained with rectified flow on synthetic shape scenes (workers/toy/scenes.py).
It exists so that sink analyses have a trained model with known answers; nothing measured on it transfers to SD3.

## Training run

| | |
|---|---|
| date | {card['trained_utc']} |
| device | {card['device']} (torch {card['torch']}, Python {card['python']}) |
| command | `{card['command']}` |
| data | {card['train_images']} rendered scenes of seed {card['seed']}, {card['distinct_prompts']} distinct prompts |
| VAE | {v['steps']} steps × batch {v['batch']}, {v['seconds']} s; L1 {v['l1_first']:.4f} → {v['l1_last']:.4f}; held-out PSNR {v['eval_psnr_db']} dB |
| transformer | {t['steps']} steps × batch {t['batch']}, {t['seconds']} s, lr {t['lr']}, EMA {t['ema']}; loss {t['loss_first']:.4f} → {t['loss_last']:.4f} |
| held-out flow loss | untrained {t['eval_flow_loss']['untrained']:.4f}, last {t['eval_flow_loss']['last']:.4f}, EMA (shipped) {t['eval_flow_loss']['ema']:.4f} |
| total | {card['total_seconds']} s in the training process |
| weights | {sum(card['bytes'].values()) / 1e6:.1f} MB fp16 safetensors ({', '.join(f'{k} {b / 1e6:.1f} MB' for k, b in card['bytes'].items())}) |

Training loss every {t['loss_curve_every']} steps (a tenth of the points): {curve}

Sources as trained (sha256):

| file | sha256 |
|---|---|
{hashes}

## Score: toy-GenEval

{e['images']} images: the {e['prompts']} prompts of the bundled `toy-geneval` set × {e['seeds']} seeds, {e['steps']} Euler
steps, CFG {e['guidance']}, 64² px, generated on a CPU. toy-GenEval on the generator's own renders of
{e['renders_checked']} evaluation scenes: {e['toy_geneval_on_generator_renders']:.3f}.

| category | accuracy |
|---|---|
{cats}
| **overall** | **{e['toy_geneval_overall']:.3f}** |

Retrain: docs/toy.md.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workers.toy.card", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args(argv)
    card = json.loads((args.weights / "train_card.json").read_text(encoding="utf-8"))
    assert card["preset"] == TOY_PRESET, card["preset"]
    card["note"] = TOY_NOTE
    card["evaluation"] = evaluate(args.weights, args.seeds, args.steps, args.guidance)
    (args.weights / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    (args.weights / "MODEL_CARD.md").write_text(markdown(card), encoding="utf-8")
    print(json.dumps(card["evaluation"], indent=1))


if __name__ == "__main__":
    main()
