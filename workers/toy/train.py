"""Train the toy model (workers.toy.model) on synthetic shapes (workers.toy.scenes): VAE first, then the DiT.

    python -m workers.toy.train --out DIR [--device cuda] [--dit-seconds 300 | --dit-steps N] ...

1. Render `--images` scenes of the training stream (seed `--seed`, all six GenEval categories in turn).
2. Train the AutoencoderKL (L1 reconstruction + a small KL term), then set its latent shift / scale to the
   measured mean / 1 / std of the latents, as SD3's VAE config does.
3. Encode every image once (posterior mode) and every distinct prompt once with the frozen CLIP encoders
   through the pipeline's own `encode_prompt` (so training sees exactly what inference feeds the transformer,
   the 256 zero T5 tokens included); "" stands for the unconditional branch (10 % of the batch).
4. Train the SD3Transformer2DModel with rectified flow as SD3 does: x_t = (1 − σ) x₀ + σ ε, target ε − x₀,
   σ logit-normal(0, 1), timestep 1000 σ; AdamW, linear warm-up then cosine decay, EMA of the weights.
   With `--dit-steps 0` the step count is fixed after 20 timed steps so that the run fills `--dit-seconds`;
   the count is logged, and `--dit-steps N` repeats the run with the same schedule.
5. Write the EMA transformer, the VAE and the text encoders (fp16 safetensors, diffusers layout) to
   `OUT/toy-sd3/`, with `train_card.json` (hashes of this script, the model and the data generator, steps,
   losses, times, device); `python -m workers.toy.card` then scores the model and writes the shipped card.

Every random draw comes from a generator seeded by `--seed`; GPU kernels are not bitwise deterministic, so a
rerun on another device matches in distribution, not bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workers.toy import scenes
from workers.toy.model import INIT_SEED, TOY_PRESET, build_toy_modules, save_toy_modules, toy_pipeline

TRAIN_SEED = 1  # the training stream of scenes; the bundled evaluation prompts use scenes.EVAL_SEED
UNCOND_FRACTION = 0.1
CALIBRATION_STEPS = 20
SOURCE_FILES = ("workers/toy/train.py", "workers/toy/model.py", "workers/toy/scenes.py")


def source_hashes() -> dict[str, str]:
    """sha256 of the files that define the training run (script, architecture, data generator)."""
    root = Path(__file__).resolve().parents[2]
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in SOURCE_FILES}


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, start, count = args
    batch = scenes.generate(seed, count, start)
    return scenes.render_batch(batch), [s.prompt for s in batch]


def render_dataset(seed: int, count: int, processes: int, chunk: int = 2000) -> tuple[np.ndarray, list[str]]:
    """uint8 images [count, 64, 64, 3] and their prompts, rendered in parallel (same result for any `processes`)."""
    jobs = [(seed, start, min(chunk, count - start)) for start in range(0, count, chunk)]
    if processes <= 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]


class Log:
    """Lines to stdout and a JSON-lines file (every record also kept for the card)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self.start = time.perf_counter()

    def __call__(self, event: str, **fields) -> None:
        record = {"event": event, "t": round(time.perf_counter() - self.start, 2), **fields}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def run_steps(requested: int, seconds: float, step_fn, log: Log, what: str) -> int:
    """Run `requested` steps of `step_fn(step, total)`; with requested = 0, time CALIBRATION_STEPS steps first and
    run as many as fill `seconds` (logged, so `requested` can repeat the schedule). Returns the total."""
    first = 0
    total = requested
    if not requested:
        began = 0.0
        for step in range(CALIBRATION_STEPS):
            if step == 5:  # the first steps pay for kernel selection and allocations
                began = time.perf_counter()
            step_fn(step, 10**9)  # warm-up learning rates do not depend on the total
        per_step = (time.perf_counter() - began) / (CALIBRATION_STEPS - 5)
        total = max(CALIBRATION_STEPS + 1, int(seconds / per_step))
        first = CALIBRATION_STEPS
        log(f"{what}_calibrated", seconds_per_step=round(per_step, 5), total_steps=total)
    for step in range(first, total):
        step_fn(step, total)
    return total


def train_vae(vae, images: torch.Tensor, args, log: Log, gen: torch.Generator) -> list[float]:
    device = images.device
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    window: list[float] = []

    def step_fn(step: int, total: int) -> None:
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, args.vae_lr, warmup=100)
        idx = torch.randint(len(images), (args.vae_batch,), generator=gen, device=device)
        x = _to_unit(images[idx])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
            rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec.float(), x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        window.append(rec_loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            losses.append(torch.stack(window).mean().item())
            log("vae", step=step + 1, l1=round(losses[-1], 5), kl_per_dim=round(kl.item(), 4), lr=f"{opt.param_groups[0]['lr']:.2e}")
            window.clear()

    total = run_steps(args.vae_steps, args.vae_seconds, step_fn, log, "vae")
    vae.eval().requires_grad_(False)
    args.vae_steps_done = total
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Posterior modes of all images, unnormalised."""
    out = []
    for start in range(0, len(images), batch):
        with _autocast(images.device):
            out.append(vae.encode(_to_unit(images[start : start + batch])).latent_dist.mode().float())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    x = _to_unit(images)
    with _autocast(images.device):
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device: torch.device, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, 333, 64] sequence and [P, 64] pooled embeddings, exactly as the pipeline computes them."""
    seqs, pooled = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        embeds, _, pool, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                                do_classifier_free_guidance=False, max_sequence_length=256)
        seqs.append(embeds.float())
        pooled.append(pool.float())
    return torch.cat(seqs), torch.cat(pooled)


def train_transformer(transformer, latents, prompt_index, seq, pooled, args, log: Log, gen: torch.Generator):
    """Rectified-flow training; returns (EMA copy, logged losses)."""
    device = latents.device
    transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    losses: list[float] = []
    window: list[float] = []
    ema_params = list(ema.parameters())
    params = list(transformer.parameters())

    def step_fn(step: int, total: int) -> None:
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, args.lr, warmup=args.warmup)
        # every draw on the training device from its own seeded generator (no host round trip per step)
        idx = torch.randint(len(latents), (args.batch,), generator=gen, device=device)
        drop = torch.rand(args.batch, generator=gen, device=device) < UNCOND_FRACTION
        p = torch.where(drop, torch.zeros_like(idx), prompt_index[idx])  # prompt 0 is ""
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))
        noise = torch.randn((args.batch, *latents.shape[1:]), generator=gen, device=device)
        x0 = latents[idx]
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with _autocast(device):
            pred = transformer(hidden_states=xt, encoder_hidden_states=seq[p], pooled_projections=pooled[p],
                               timestep=sigma * 1000, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [q.detach() for q in params], 1 - decay)
        window.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            losses.append(torch.stack(window).mean().item())
            log("dit", step=step + 1, loss=round(losses[-1], 5), lr=f"{opt.param_groups[0]['lr']:.2e}")
            window.clear()

    total = run_steps(args.dit_steps, args.dit_seconds, step_fn, log, "dit")
    transformer.eval().requires_grad_(False)
    args.dit_steps_done = total
    return ema, losses


@torch.no_grad()
def flow_loss(transformer, latents, prompt_index, seq, pooled, seed: int = 0, batch: int = 512) -> float:
    """Mean rectified-flow loss on held-out latents (fixed σ grid and noise): comparable across models."""
    gen = torch.Generator().manual_seed(seed)
    n = len(latents)
    sigma = ((torch.arange(n) + 0.5) / n)[torch.randperm(n, generator=gen)]
    noise = torch.randn(latents.shape, generator=gen)
    total = 0.0
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        s = sigma[sl].to(latents.device)
        x0, eps = latents[sl], noise[sl].to(latents.device)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        p = prompt_index[sl]
        with _autocast(latents.device):
            pred = transformer(hidden_states=xt, encoder_hidden_states=seq[p], pooled_projections=pooled[p],
                               timestep=s * 1000, return_dict=False)[0]
        total += F.mse_loss(pred.float(), eps - x0, reduction="sum").item()
    return total / latents.numel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.toy.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (weights in OUT/toy-sd3, log in OUT/train_log.jsonl)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=TRAIN_SEED, help="training scenes and every random draw of training")
    ap.add_argument("--images", type=int, default=120_000, help="training scenes rendered")
    ap.add_argument("--eval-images", type=int, default=1024, help="held-out scenes (evaluation stream) for PSNR and loss")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="rendering processes")
    ap.add_argument("--vae-steps", type=int, default=0, help="VAE steps (0: fill --vae-seconds)")
    ap.add_argument("--vae-seconds", type=float, default=75.0)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the KL term per latent element")
    ap.add_argument("--dit-steps", type=int, default=0, help="transformer steps (0: fill --dit-seconds)")
    ap.add_argument("--dit-seconds", type=float, default=300.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--samples", type=int, default=12, help="sample images written after training (0: none)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    log = Log(log_path)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = datetime.now(timezone.utc)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    log("start", device=device_name, torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()})

    t0 = time.perf_counter()
    images_np, prompts = render_dataset(args.seed, args.images, args.processes)
    eval_np, eval_prompts = render_dataset(scenes.EVAL_SEED, args.eval_images, args.processes)
    log("data", images=len(images_np), distinct_prompts=len(set(prompts)), seconds=round(time.perf_counter() - t0, 1))
    images = torch.from_numpy(images_np).to(device)
    eval_images = torch.from_numpy(eval_np).to(device)

    modules = build_toy_modules(INIT_SEED)
    for module in modules.values():
        module.to(device)
    for name in ("text_encoder", "text_encoder_2"):
        modules[name].eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    t0 = time.perf_counter()
    vae_losses = train_vae(modules["vae"], images, args, log, gen)
    vae_seconds = time.perf_counter() - t0
    psnr = reconstruction_psnr(modules["vae"], eval_images[:512])
    raw = encode_latents(modules["vae"], images)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    modules["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    eval_latents = (encode_latents(modules["vae"], eval_images) - shift) * scale
    log("vae_done", seconds=round(vae_seconds, 1), eval_psnr_db=round(psnr, 2), shift_factor=round(shift, 5), scaling_factor=round(scale, 5))

    pipe = toy_pipeline(modules)
    vocabulary = [""] + sorted(set(prompts) | set(eval_prompts))
    seq, pooled = encode_prompts(pipe, vocabulary, device)
    where = {text: i for i, text in enumerate(vocabulary)}
    prompt_index = torch.tensor([where[t] for t in prompts], device=device)
    eval_index = torch.tensor([where[t] for t in eval_prompts], device=device)
    log("text", prompts=len(vocabulary), seq_shape=list(seq.shape))

    untrained_eval = flow_loss(modules["transformer"], eval_latents, eval_index, seq, pooled)
    t0 = time.perf_counter()
    ema, dit_losses = train_transformer(modules["transformer"], latents, prompt_index, seq, pooled, args, log, gen)
    dit_seconds = time.perf_counter() - t0
    eval_loss = {"untrained": untrained_eval, "last": flow_loss(modules["transformer"], eval_latents, eval_index, seq, pooled),
                 "ema": flow_loss(ema, eval_latents, eval_index, seq, pooled)}
    log("dit_done", seconds=round(dit_seconds, 1), eval_flow_loss={k: round(v, 5) for k, v in eval_loss.items()})

    modules["transformer"] = ema
    weights = args.out / TOY_PRESET
    sizes = save_toy_modules(modules, weights)
    card = {
        "preset": TOY_PRESET,
        "trained_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python -m workers.toy.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "source_sha256": source_hashes(),
        "seed": args.seed,
        "init_seed": INIT_SEED,
        "train_images": args.images,
        "distinct_prompts": len(set(prompts)),
        "vae": {"steps": args.vae_steps_done, "batch": args.vae_batch, "seconds": round(vae_seconds, 1),
                "l1_first": vae_losses[0] if vae_losses else None, "l1_last": vae_losses[-1] if vae_losses else None,
                "eval_psnr_db": round(psnr, 2), "shift_factor": shift, "scaling_factor": scale},
        "transformer": {"steps": args.dit_steps_done, "batch": args.batch, "seconds": round(dit_seconds, 1), "lr": args.lr,
                        "ema": args.ema, "loss_first": dit_losses[0] if dit_losses else None,
                        "loss_last": dit_losses[-1] if dit_losses else None, "eval_flow_loss": eval_loss,
                        "loss_curve_every": args.log_every, "loss_curve": [round(v, 5) for v in dit_losses]},
        "bytes": sizes,
        "total_seconds": round(time.perf_counter() - log.start, 1),
    }
    (weights / "train_card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    log("saved", folder=str(weights), bytes=sum(sizes.values()))
    if args.samples:
        _write_samples(modules, args.out / "samples.png", vocabulary[1:], args.samples, device)
    return weights


@torch.no_grad()
def _write_samples(modules: dict, path: Path, prompts: list[str], count: int, device: torch.device) -> None:
    """A row of sample images (20 steps, CFG 4) for a first look; the score comes from workers.toy.card."""
    from PIL import Image

    pipe = toy_pipeline(modules)
    rng = np.random.default_rng(0)
    chosen = [prompts[i] for i in rng.choice(len(prompts), size=min(count, len(prompts)), replace=False)]
    out = pipe(prompt=chosen, num_inference_steps=20, guidance_scale=4.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    strip = (np.concatenate(list(out), axis=1) * 255).round().astype(np.uint8)
    Image.fromarray(strip).save(path)
    (path.with_suffix(".txt")).write_text("\n".join(chosen) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
