"""Training the embedded teacher: its VAE on pixels, then its U-Net on VAE latents.

Both loops are plain AdamW with a fixed generator, so the same seed and thread count give the same
weights. Losses are returned per step for the notebook's curves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .teacher import Teacher


def train_vae(teacher: Teacher, crops: torch.Tensor, steps: int, batch_size: int, lr: float,
              kl_weight: float, generator: torch.Generator) -> list[dict]:
    """L1 reconstruction + KL (SD's autoencoder recipe without its GAN and LPIPS terms)."""
    vae = teacher.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    log = []
    for step in tqdm(range(steps), desc="vae"):
        x = crops[torch.randint(len(crops), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean()
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss, "vae", step)
        log.append({"step": step, "l1": l1.item(), "kl": kl.item()})
    vae.eval()
    return log


@torch.no_grad()
def encode_latents(teacher: Teacher, crops: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, ...]:
    """Posterior mean and std of every crop (drawn from per step, as SD's training does)."""
    means, stds = [], []
    for i in range(0, len(crops), batch):
        dist = teacher.vae.encode(crops[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def set_scaling_factor(teacher: Teacher, latent_mean: torch.Tensor) -> float:
    """SD scales latents to unit variance (0.18215 for its VAE); measure ours the same way."""
    factor = float(1.0 / latent_mean.std())
    teacher.vae.register_to_config(scaling_factor=factor)
    return factor


def fixed_eval_batch(latents: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> dict:
    """A fixed set of (latent, label, timestep, noise) to compare denoising losses before and after."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(latents), (n,), generator=g)
    timesteps = torch.linspace(0, 999, n).round().long()  # the whole schedule, evenly
    return {"x0": latents[idx], "labels": labels[idx], "t": timesteps,
            "noise": torch.randn(latents[idx].shape, generator=g)}


@torch.no_grad()
def denoise_loss(unet: torch.nn.Module, noise_sched: DDPMScheduler, batch: dict,
                 text_states: torch.Tensor) -> float:
    noisy = noise_sched.add_noise(batch["x0"], batch["noise"], batch["t"])
    pred = unet(noisy, batch["t"], encoder_hidden_states=text_states[batch["labels"]]).sample
    return F.mse_loss(pred, batch["noise"]).item()


def train_unet(teacher: Teacher, latent_mean: torch.Tensor, latent_std: torch.Tensor,
               labels: torch.Tensor, text_states: torch.Tensor, steps: int, batch_size: int,
               lr: float, uncond_prob: float, generator: torch.Generator) -> list[dict]:
    """Epsilon-prediction MSE on SD's noise schedule; `text_states[-1]` is the empty prompt.

    A prompt is swapped for the empty one with probability `uncond_prob`, so that the same U-Net also
    predicts unconditionally and classifier-free guidance works at sampling time.
    """
    unet = teacher.unet.train()
    noise_sched = DDPMScheduler.from_config(teacher.scheduler.config)
    scale = teacher.vae.config.scaling_factor
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    empty = len(text_states) - 1
    log = []
    for step in tqdm(range(steps), desc="unet"):
        idx = torch.randint(len(latent_mean), (batch_size,), generator=generator)
        x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape,
                                                               generator=generator)) * scale
        cond = labels[idx].clone()
        cond[torch.rand(batch_size, generator=generator) < uncond_prob] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_sched.config.num_train_timesteps, (batch_size,), generator=generator)
        pred = unet(noise_sched.add_noise(x0, noise, t), t,
                    encoder_hidden_states=text_states[cond]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _check_finite(loss, "unet", step)
        log.append({"step": step, "mse": loss.item()})
    unet.eval()
    return log


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss became {loss.item()} at step {step}; "
                                 "lower the learning rate or check the data")


@torch.no_grad()
def sample(teacher: Teacher, prompts: list[str], seeds: list[int], steps: int, guidance: float,
           unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Images [prompt, seed, 3, H, W] in [0, 1] from the real diffusers pipeline.

    The same seed gives the same starting noise for every prompt, so differences between rows come
    from the prompt alone.
    """
    pipe = teacher.pipeline(unet)
    side = 8 * teacher.latent_px
    rows = []
    for prompt in tqdm(prompts, desc="sample", leave=False):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(prompt=[prompt] * len(seeds), height=side, width=side, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="pt").images
        rows.append(out)
    return torch.stack(rows)


def prompt_separation(images: torch.Tensor) -> dict[str, float]:
    """How much the prompt moves a sample, against how much the noise seed does.

    `between`: RMS difference of two prompts from the same noise; `within`: RMS difference of one
    prompt from two noises. A model that ignored its prompt would give between = 0.
    """
    p, s = images.shape[:2]
    flat = images.reshape(p, s, -1)
    between = [(flat[i] - flat[j]).pow(2).mean(-1).sqrt().mean()
               for i in range(p) for j in range(p) if i < j]
    within = [(flat[:, a] - flat[:, b]).pow(2).mean(-1).sqrt().mean()
              for a in range(s) for b in range(s) if a < b]
    between = torch.stack(between).mean().item() if between else 0.0
    within = torch.stack(within).mean().item() if within else float("nan")
    return {"between_prompts_rms": between, "within_prompt_rms": within,
            "separation_ratio": between / within if within else float("nan")}
