"""Training the embedded teacher: its VAE on pixels, then its U-Net on VAE latents.

Both loops are plain AdamW with a fixed generator, so the same seed and thread count give the same
weights. Losses are returned per step for the notebook's curves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .data import random_crops, to_unit
from .progress import bar
from .quality import lpips_mnv2, paired
from .teacher import Teacher


LOGVAR_INIT = -8.0  # start the posterior nearly deterministic (std e^-4): a fresh encoder's unit-variance
# samples would bury the image in noise and waste the first hundreds of steps (the KL term still acts)


@dataclass(frozen=True)
class VaePhase:
    """One leg of a VAE's training: its crops, steps, crops per step and peak learning rate."""

    crops: torch.Tensor
    steps: int
    batch_size: int
    lr: float


def tune_phase(photos: list[torch.Tensor], crops: int, crop_px: int, leg, generator: torch.Generator) -> VaePhase:
    """The second leg `leg` (a params group with `steps`, `crop_px`, `batch_size` and `lr`, such as
    `train_teacher.vae_tune`) on as many pixels in all as `crops` crops of `crop_px` (the first leg's):
    a larger crop size means fewer crops, not more memory."""
    larger, _ = random_crops(photos, crops * crop_px ** 2 // leg.crop_px ** 2, leg.crop_px, generator)
    return VaePhase(larger, leg.steps, leg.batch_size, leg.lr)


@dataclass
class LegStep:
    """One optimiser step of `leg_steps`: which leg, its step `i`, the step over all legs, the batch."""

    phase: int
    i: int
    step: int
    leg: VaePhase
    x: torch.Tensor
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    @property
    def last(self) -> bool:  # the leg's final step
        return self.i + 1 == self.leg.steps


def leg_steps(legs: list[VaePhase], params, generator: torch.Generator, desc: str):
    """The steps of each leg in turn, each leg with a fresh AdamW and one-cycle rate, and each step with
    a batch drawn from that leg's crops. A leg of 0 steps is skipped. Small crops are cheap, but a 32-px
    crop's 4x4 latent is all border: a VAE that saw only such crops en- and decodes the inside of a
    128-px tile otherwise (a colour cast), hence a last leg on larger crops (`tune_phase`)."""
    params, step = list(params), 0
    for phase, leg in enumerate(leg for leg in legs if leg.steps):
        opt = adamw(params, leg.lr)
        sched = one_cycle(opt, leg.lr, leg.steps)
        for i in bar(range(leg.steps), desc=desc if phase == 0 else f"{desc}, {leg.crops.shape[-1]}-px crops"):
            x = leg.crops[torch.randint(len(leg.crops), (leg.batch_size,), generator=generator)]
            yield LegStep(phase, i, step, leg, x, opt, sched)
            step += 1


def train_vae(teacher: Teacher, crops: torch.Tensor, steps: int, batch_size: int, lr: float,
              kl_weight: float, generator: torch.Generator, net=None, perceptual_weight: float = 0.0,
              perceptual_every: int = 1, eval_images: torch.Tensor | None = None,
              evals: int = 4, tune: VaePhase | None = None) -> list[dict]:
    """L1 reconstruction + KL + lpips_mnv2 on feature network `net` (SD's autoencoder recipe without
    its GAN). The perceptual term, which doubles a step's cost, is added on every `perceptual_every`-th
    step. With `eval_images`, quality on them is logged `evals` times in the first leg and at the end
    of the second, so it reads against time.

    `tune` is a second leg on larger crops (see `leg_steps`). Measured on the embedded teacher (Zen 4
    EPYC, 2 threads, Kodak's 128-px tiles, one run each), while the log-variance start was still set
    before quant_conv (so it did not reach the posterior): 2000 steps on 32-px crops read 17.2 dB, and
    2000 on 64-px crops 17.3 dB; 1500 on 32-px crops, then 8 crops of 64 px a step, 20.4 dB after 700
    such steps and 21.4 dB after 1500. With the start where the posterior leaves the encoder, that last
    recipe reads 21.9 dB. Rows carry their `phase` (0, 1) and count steps and seconds across both legs.
    """
    vae = teacher.vae.train()
    with torch.no_grad():  # start the posterior's logvar half at LOGVAR_INIT where (mean, logvar) leave the
        # encoder: its quant_conv when it has one (SD's VAE does), which would otherwise mix them again
        out = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        half = out.out_channels // 2
        out.weight[half:].zero_()
        out.bias[half:].fill_(LOGVAR_INIT)
    log, t0, eval_s = [], time.perf_counter(), 0.0
    every = max(10, steps // evals)
    for s in leg_steps([VaePhase(crops, steps, batch_size, lr), *([tune] if tune else [])], vae.parameters(),
                       generator, "vae"):
        posterior = vae.encode(s.x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (recon - s.x).abs().mean()
        kl = posterior.kl().mean()
        loss = l1 + kl_weight * kl
        row = {"step": s.step, "phase": s.phase, "l1": l1.item(), "kl": kl.item()}
        if net is not None and perceptual_weight > 0 and s.step % perceptual_every == 0:
            p = lpips_mnv2(net, to_unit(recon), to_unit(s.x)).mean()
            loss = loss + perceptual_weight * p
            row["perceptual"] = p.item()
        optimizer_step(s.opt, loss, "vae", s.step, clip=vae, sched=s.sched)
        if eval_images is not None and (s.last or (s.phase == 0 and (s.i + 1) % every == 0)):
            vae.eval()
            t1 = time.perf_counter()
            row |= {"seconds": t1 - t0 - eval_s, **vae_quality(vae, eval_images, net)}  # training time only
            eval_s += time.perf_counter() - t1
            vae.train()
        log.append(row)
    vae.eval()
    return log


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Encode (posterior mean) and decode, as a restoration or a round trip would."""
    return torch.cat([vae.decode(vae.encode(images[i:i + batch]).latent_dist.mean).sample
                      for i in range(0, len(images), batch)])


def vae_quality(vae, images: torch.Tensor, net=None) -> dict[str, float]:
    """PSNR, SSIM, MS-SSIM (and lpips_mnv2 with `net`) of the encode-decode round trip of [-1, 1] images."""
    return paired(net, to_unit(reconstruct(vae, images)), to_unit(images))


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


SCENE = {"zoom": (1.0, 1.1), "shift": 0.15, "flip": False}  # how a prompt's picture is cropped


def scene_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator):
    """Crops of the photos as the teacher learns them (`SCENE`), with photo indices: its training set,
    and the reference its samples are matched against."""
    return random_crops(photos, n, size, generator, **SCENE)


def latent_set(teacher: Teacher, photos: list[torch.Tensor], prompts: list[str], n: int,
               generator: torch.Generator, uncond_prob: float, set_scale: bool = False) -> LatentSet:
    """`n` whole-scene crops of the photos (prompt i is photo i) through the teacher's VAE.

    A crop shows nearly the whole scene (`SCENE`: zoom 1-1.1, within 15 % of the centre, never
    mirrored), so each prompt names one picture with small variations: a teacher trained for minutes
    learns 36 such pictures; with crops anywhere at zoom up to 1.5 it learnt only their average colours.
    `set_scale` first measures the VAE's latent scaling factor on these latents (a freshly trained VAE).
    """
    crops, labels = scene_crops(photos, n, 8 * teacher.latent_px, generator)
    mean, std = encode_latents(teacher, crops)
    if set_scale:
        set_scaling_factor(teacher, mean)
    sched = DDPMScheduler.from_config(teacher.scheduler.config)
    return LatentSet(mean, std, labels, teacher.encode_prompts(list(prompts) + [""]),
                     teacher.vae.config.scaling_factor, sched, uncond_prob)


def eval_batch(data: LatentSet, n: int, seed: int) -> dict:
    """A fixed batch with timesteps spread evenly over the schedule, to compare losses before/after."""
    t = torch.linspace(0, data.noise_sched.config.num_train_timesteps - 1, n).round().long()
    return data.draw(n, torch.Generator().manual_seed(seed), t=t)


@torch.no_grad()
def denoise_loss(unet: torch.nn.Module, batch: dict) -> float:
    pred = unet(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    return F.mse_loss(pred, batch["target"]).item()


def timesteps(u: torch.Tensor, high: torch.Tensor, n_t: int) -> torch.Tensor:
    """Training timesteps from uniform draws `u` in [0, 1): over all of 0..n_t-1, or, where `high`,
    over the noisiest 40 % (0.6 n_t..n_t-1)."""
    return torch.where(high, (0.6 * n_t + u * 0.4 * n_t).long(), (u * n_t).long()).clamp(max=n_t - 1)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights for the timesteps' SNRs (see `train_unet`)."""
    if prediction_type == "v_prediction":
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma) / snr.clamp(min=1e-8)


def train_unet(unet: torch.nn.Module, data: LatentSet, steps: int, batch_size: int, lr: float,
               generator: torch.Generator, min_snr_gamma: float = 0.0, high_noise_share: float = 0.0
               ) -> list[dict]:
    """MSE against the scheduler's prediction target (noise or velocity), one-cycle learning rate.

    Two measured aids for a teacher trained in minutes, both off by default (0):
    - `min_snr_gamma`: Min-SNR loss weighting (Hang et al. 2023) caps the weight of low-noise steps, so
      they stop dominating the gradient. For v-prediction the weight is min(SNR + 1, gamma) /
      (SNR + 1), with SNR + 1 where the paper's min(SNR, gamma) / (SNR + 1) has SNR: under the
      zero-terminal-SNR schedule the paper's form is 0 at t = 999, the step every sample starts from
      (where the prompt alone must give the layout), and ~0.03 on average over the noisiest 40 %;
    - `high_noise_share`: that share of each batch takes t in the noisiest 40 % of the schedule, where
      the prompt decides the picture's layout and colours.
    Timesteps are drawn over all of 0..999 (the noisy share over 600..999).
    """
    unet.train()
    opt = adamw(unet.parameters(), lr)
    sched = one_cycle(opt, lr, steps)
    alphas = data.noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    n_t = data.noise_sched.config.num_train_timesteps
    log = []
    for step in bar(range(steps), desc="unet"):
        u = torch.rand(batch_size, generator=generator)
        high = torch.rand(batch_size, generator=generator) < high_noise_share
        b = data.draw(batch_size, generator, t=timesteps(u, high, n_t))
        err = (unet(b["noisy"], b["t"], encoder_hidden_states=b["text"]).sample - b["target"]).pow(2).mean((1, 2, 3))
        if min_snr_gamma > 0:
            w = min_snr_weight(snr[b["t"].cpu()], min_snr_gamma, data.noise_sched.config.prediction_type)
            w = w.to(err.device)
            loss = (w * err).sum() / w.sum()
        else:
            loss = err.mean()
        optimizer_step(opt, loss, "unet", step, clip=unet, sched=sched)
        log.append({"step": step, "mse": err.mean().item(), "loss": loss.item()})
    unet.eval()
    return log


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, as every training loop here uses it, on the fused kernel: with the
    default per-tensor update, an embedded U-Net step on 2 threads spent ~45 of its ~340 ms updating its
    686 tensors; fused, 13 ms (CPU and CUDA alike)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def one_cycle(opt, lr: float, steps: int):
    """One-cycle learning rate: a short warm-up (5 %, at least 2 steps) to `lr`, then cosine to ~0;
    a constant `lr` for runs too short to warm up (a handful of smoke-test steps)."""
    if steps < 8:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2.5 / steps))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str, step: int,
                   clip: torch.nn.Module | None = None, sched=None) -> None:
    """One update from `loss`: gradients cleared and computed, clipped to norm 1 over `clip`'s parameters
    when given, applied, the schedule advanced when given; then a loss that is not finite stops training,
    naming `what` and the step. Every training loop of the study steps this way."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    check_finite(loss, what, step)


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss became {loss.item()} at step {step}; "
                                 "lower the learning rate or check the data")


@torch.no_grad()
def sample(teacher: Teacher, prompts: list[str], seeds: list[int], steps: int, guidance: float,
           unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Images [prompt, seed, 3, H, W] in [0, 1], as the diffusers pipeline would draw them.

    Seed s starts from the noise the pipeline draws with `torch.Generator().manual_seed(s)`, the same
    for every prompt, so differences between rows come from the prompt alone. All prompts run batched
    through `generate` (tested equal to the pipeline), not one pipeline call per prompt.
    """
    px, ch = teacher.latent_px, teacher.unet.config.in_channels
    noise = torch.cat([torch.randn(1, ch, px, px, generator=torch.Generator().manual_seed(s)) for s in seeds])
    text = teacher.encode_prompts(list(prompts))
    images = generate(teacher, unet or teacher.unet, text.repeat_interleave(len(seeds), 0),
                      noise.repeat(len(prompts), 1, 1, 1), steps, guidance)
    return images.view(len(prompts), len(seeds), *images.shape[1:])


@torch.no_grad()
def generate(teacher: Teacher, unet: torch.nn.Module, text: torch.Tensor, noise: torch.Tensor, steps: int,
             guidance: float, batch: int = 32, latents_only: bool = False) -> torch.Tensor:
    """Images in [0, 1] from given (text state, starting noise) pairs: the pipeline's DDIM sampler with
    classifier-free guidance, batched over pairs (the pipeline runs one prompt at a time).

    `text` [N, L, D] are prompt states, `noise` [N, 4, h, w] the starting latents; the same pairs give
    the same images whatever the U-Net, so two U-Nets' images compare pair by pair."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(teacher.scheduler.config)
    uncond = teacher.encode_prompts([""])
    out = []
    for i in range(0, len(noise), batch):
        x = noise[i:i + batch] * sched.init_noise_sigma
        cond = text[i:i + batch]
        states = torch.cat([uncond.expand(len(x), -1, -1), cond])
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            pred = unet(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=states).sample
            u, c = pred.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        out.append(x if latents_only else
                   teacher.vae.decode(x / teacher.vae.config.scaling_factor).sample.add(1).div(2).clamp(0, 1))
    return torch.cat(out)


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
