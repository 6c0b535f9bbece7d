"""Training the embedded teacher: its VAE on pixels, then its U-Net on VAE latents.

Both loops are plain AdamW with a fixed generator, so the same seed and thread count give the same
weights. Losses are returned per step for the notebook's curves.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        check_finite(loss, "vae", step)
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


@dataclass
class LatentSet:
    """Encoded crops and prompt states; draws noisy training batches the way the teacher learnt.

    `text_states[-1]` is the empty prompt; a label is swapped for it with probability `uncond_prob`,
    so that one U-Net also predicts unconditionally and classifier-free guidance works.
    """

    mean: torch.Tensor  # VAE posterior means of the crops
    std: torch.Tensor  # and their standard deviations (a fresh latent is drawn per use)
    labels: torch.Tensor  # prompt index of each crop
    text_states: torch.Tensor  # one row per prompt, the empty prompt last
    scale: float  # the VAE's latent scaling factor
    noise_sched: DDPMScheduler  # SD's forward process
    uncond_prob: float  # prompt dropout

    def draw(self, batch_size: int, generator: torch.Generator, t: torch.Tensor | None = None) -> dict:
        """A batch of noisy latents, timesteps, text states and targets; `t` fixes the timesteps."""
        dev = self.mean.device  # random draws stay on the CPU generator: same batches on any device
        idx = torch.randint(len(self.mean), (batch_size,), generator=generator)
        x0 = (self.mean[idx.to(dev)] + self.std[idx.to(dev)] * torch.randn(
            (batch_size, *self.mean.shape[1:]), generator=generator).to(dev)) * self.scale
        cond = self.labels[idx].clone()
        cond[torch.rand(batch_size, generator=generator) < self.uncond_prob] = len(self.text_states) - 1
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        if t is None:
            t = torch.randint(self.noise_sched.config.num_train_timesteps, (batch_size,),
                              generator=generator)
        t, cond = t.to(dev), cond.to(self.text_states.device)
        return {"noisy": self.noise_sched.add_noise(x0, noise, t), "t": t,
                "text": self.text_states[cond], "target": target(self.noise_sched, x0, noise, t)}


def target(noise_sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """What the U-Net predicts: the noise (SD-1.5) or the velocity (v-prediction teachers)."""
    kind = noise_sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_sched.get_velocity(x0, noise, t)
    raise ValueError(f"scheduler prediction_type {kind!r}: only 'epsilon' and 'v_prediction' train here")


def eval_batch(data: LatentSet, n: int, seed: int) -> dict:
    """A fixed batch with timesteps spread evenly over the schedule, to compare losses before/after."""
    t = torch.linspace(0, data.noise_sched.config.num_train_timesteps - 1, n).round().long()
    return data.draw(n, torch.Generator().manual_seed(seed), t=t)


@torch.no_grad()
def denoise_loss(unet: torch.nn.Module, batch: dict) -> float:
    pred = unet(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    return F.mse_loss(pred, batch["target"]).item()


def train_unet(unet: torch.nn.Module, data: LatentSet, steps: int, batch_size: int, lr: float,
               generator: torch.Generator) -> list[dict]:
    """MSE against the scheduler's prediction target (noise or velocity), one-cycle learning rate."""
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    log = []
    for step in tqdm(range(steps), desc="unet"):
        b = data.draw(batch_size, generator)
        loss = F.mse_loss(unet(b["noisy"], b["t"], encoder_hidden_states=b["text"]).sample, b["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        check_finite(loss, "unet", step)
        log.append({"step": step, "mse": loss.item()})
    unet.eval()
    return log


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
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
