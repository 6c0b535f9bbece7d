"""The slim VAE: a narrower diffusers `AutoencoderKL`, initialised from the teacher's and distilled.

The slim VAE keeps the teacher's latent channels, scaling factor and down/up factor (8), so it is
a drop-in replacement: `pipe.vae = slim` works in a `StableDiffusionPipeline`, and it decodes
the latents the teacher's U-Net (or any student) generates. Each option is a small frozen row of
`OPTIONS`, with the reason for it. `slim_config` turns a row into an `AutoencoderKL` config, and `build`
copies the teacher's weights into it: exact copies where the shapes match, leading channels where
they are narrowed. Every copy is logged.

What `AutoencoderKL` cannot express: one config sets the widths, depth and mid-block attention of
both halves, so a decoder wider than the encoder, or mid-block attention dropped in the decoder alone,
would need another class (and `from_pretrained` of an `AutoencoderKL` folder would no longer apply).

Scale: SD-1.5's VAE has 83,653,863 params (encoder 34.2M, decoder 49.5M) and TAESD about 2.4M. The
embedded teacher's VAE is SD's at width x1/8 with one resnet per block: 978,103 params.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from .baseline import SD15_VAE, count_params, model_config
from .data import to_unit
from .progress import bar
from .quality import lpips_mnv2, paired
from .timing import BACKENDS, host_call, interleaved_timings, time_callable, torch_threads
from .training import VaePhase, leg_steps, optimizer_step, vae_quality
from .vae_options import OPTIONS, VaeOption, option  # noqa: F401  (the table is part of this API)

SD15_VAE_PARAMS = 83_653_863  # SD-1.5's published vae/config.json, counted on the meta device


def _scaled(value: int, factor: Fraction, what: str, name: str) -> int:
    scaled = value * factor
    if scaled.denominator != 1 or scaled < 1:
        raise ValueError(f"slim VAE option {name!r}: {what} {value} x {factor} = {float(scaled):g} is not a "
                         "positive whole number; use a width that divides the teacher's")
    return int(scaled)


def slim_config(teacher_config, name: str) -> dict:
    """The teacher's `AutoencoderKL` config with the option's widths, depth, groups and attention.

    Everything else (latent channels, scaling factor, block types, so the factor 8) stays the teacher's.
    """
    opt = option(name)
    cfg = model_config(teacher_config)
    widths = [_scaled(w, opt.width, "width", name) for w in cfg["block_out_channels"]]
    groups = _scaled(cfg["norm_num_groups"], opt.groups, "GroupNorm groups", name)
    for w in widths:
        if w % groups:
            raise ValueError(f"slim VAE option {name!r}: width {w} is not divisible by its {groups} "
                             f"GroupNorm groups (widths {widths}); the groups must divide every width")
    layers = cfg["layers_per_block"]
    if opt.max_layers is not None:
        layers = min(layers, opt.max_layers)
    return cfg | {"block_out_channels": tuple(widths), "norm_num_groups": groups, "layers_per_block": layers,
                  "mid_block_add_attention": cfg.get("mid_block_add_attention", True) and opt.mid_attention}


_RESNET = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.(.+)$")


def _teacher_name(name: str, teacher_layers: int, slim_layers: int) -> str:
    """Where a slim tensor's weights come from. With fewer resnets per block, resnet 0 (it changes the
    channel count) and the block's last ones (they feed the resampler) are kept, the middle ones dropped,
    as BK-SDM keeps the outer layers of a block."""
    m = _RESNET.match(name)
    if not m or teacher_layers == slim_layers:
        return name
    blocks, block, j, rest = m.groups()
    j = int(j)  # (a decoder block has one resnet more than an encoder block in both, so the offset holds)
    src = j if j == 0 else j + teacher_layers - slim_layers
    return f"{blocks}.{block}.resnets.{src}.{rest}"


@torch.no_grad()
def build(teacher_vae: AutoencoderKL, name: str) -> tuple[AutoencoderKL, list[str]]:
    """The slim VAE of option `name`, initialised from the teacher where shapes allow, and its copy log.

    A tensor of the same shape is copied exactly; a narrowed one takes the teacher's leading channels in
    every dimension. Leading, not largest-L1: the residual stream adds every layer's channels by index,
    so one index set must hold through the whole network, and leading channels keep GroupNorm's groups.
    """
    cfg = slim_config(teacher_vae.config, name)
    slim = AutoencoderKL(**cfg)
    source = dict(teacher_vae.named_parameters())
    t_layers, s_layers = teacher_vae.config.layers_per_block, cfg["layers_per_block"]
    notes: dict[str, str] = {}  # module -> one line, in module order
    for pname, p in slim.named_parameters():
        module, _, kind = pname.rpartition(".")
        src_name = _teacher_name(pname, t_layers, s_layers)
        src = source.get(src_name)
        if src is None or src.dim() != p.dim() or any(s > t for s, t in zip(p.shape, src.shape)):
            notes[module] = f"{module} <- random init (no teacher tensor of a fitting shape)"
            continue
        p.copy_(src[tuple(slice(0, n) for n in p.shape)])
        if kind == "weight" or module not in notes:
            t_module = src_name.rpartition(".")[0]
            if p.shape == src.shape:
                how = "exact"
            elif p.dim() == 1:
                how = f"{p.shape[0]}/{src.shape[0]} channels"
            else:
                how = f"{p.shape[0]}/{src.shape[0]} out x {p.shape[1]}/{src.shape[1]} in channels"
            notes[module] = f"{module} <- teacher[{t_module}] {how}"
    return slim.eval(), list(notes.values())


# --- Distillation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    latent: float = 1.0  # slim posterior mean (scaled as the U-Net sees it) and log-variance vs the teacher's
    kl: float = 1e-6  # KL to N(0, 1), SD's weight: the posterior stays as near-deterministic as SD's
    recon: float = 1.0  # L1 of the slim round trip to the image: the slim VAE's own job
    perceptual: float = 0.1  # lpips_mnv2 of the round trip (needs the feature net): texture, not blur
    decoder: float = 1.0  # slim decoder vs teacher decoder on the teacher's latents: what a U-Net makes


TERMS = ("latent", "kl", "recon", "perceptual", "decoder")


def _latent_crops(latents: torch.Tensor, n: int, size: tuple[int, int], generator) -> torch.Tensor:
    """`n` random windows of `size` from random rows of `latents` (the whole latent if it is smaller)."""
    rows = latents[torch.randint(len(latents), (n,), generator=generator)]
    h, w = min(size[0], rows.shape[-2]), min(size[1], rows.shape[-1])
    top = torch.randint(rows.shape[-2] - h + 1, (n,), generator=generator).tolist()
    left = torch.randint(rows.shape[-1] - w + 1, (n,), generator=generator).tolist()
    return torch.stack([r[:, i:i + h, j:j + w] for r, i, j in zip(rows, top, left)])


def _terms(teacher_vae, slim, x, generator, net, weights: LossWeights,
           train_latents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t_post = teacher_vae.encode(x).latent_dist
        z_t = t_post.sample(generator=generator)  # as the U-Net's training latents were drawn
        t_image = teacher_vae.decode(z_t).sample
        if train_latents is not None:  # pipeline units: each decoder divides by its own scaling factor
            z_g = _latent_crops(train_latents, len(x), z_t.shape[-2:], generator)
            t_gen = teacher_vae.decode(z_g / teacher_vae.config.scaling_factor).sample
    post = slim.encode(x).latent_dist
    recon = slim.decode(post.sample(generator=generator)).sample
    scale = teacher_vae.config.scaling_factor  # in U-Net units the latent term means the same at any scale
    out = {"latent": F.mse_loss(post.mean * scale, t_post.mean * scale)
                     + F.mse_loss(post.logvar, t_post.logvar),
           "kl": post.kl().mean(),
           "recon": (recon - x).abs().mean()}
    if net is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and weights.perceptual > 0):
            out["perceptual"] = lpips_mnv2(net, to_unit(recon), to_unit(x)).mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.decoder > 0):
        out["decoder"] = (slim.decode(z_t).sample - t_image).abs().mean()
        if train_latents is not None:  # and on what a U-Net generates, at the same weight
            s_gen = slim.decode(z_g / slim.config.scaling_factor).sample
            out["decoder"] = out["decoder"] + (s_gen - t_gen).abs().mean()
    return out


def distill(teacher_vae: AutoencoderKL, slim: AutoencoderKL, crops: torch.Tensor, steps: int,
            batch_size: int, lr: float, weights: LossWeights, generator: torch.Generator,
            net=None, train_latents: torch.Tensor | None = None, tune: VaePhase | None = None) -> list[dict]:
    """Train the slim VAE on [-1, 1] `crops` against the teacher, on the weighted sum of five terms.

    The decoder term matches the two decoders (L1) on the teacher's encodings of the crops and, with
    `train_latents` (a U-Net's samples, in pipeline units), adds the same on random windows of those as large
    as the crops' latents: a U-Net's latents need not look like a photo's encodings.

    Every term is computed and logged each step. A term of weight 0 is left out of the loss (the
    perceptual and decoder terms are then computed without gradients); with `net=None` the perceptual
    term is logged as NaN. AdamW with a one-cycle rate, clipping and a finite check; `tune` is a second
    leg on larger crops, as `training.train_vae` takes it (rows carry their `phase`).
    """
    if net is None and weights.perceptual > 0:
        raise ValueError(f"LossWeights.perceptual = {weights.perceptual} needs the feature net `net`; "
                         "pass quality.feature_net(root) or set the weight to 0")
    if not any(getattr(weights, k) > 0 for k in TERMS):
        raise ValueError(f"every loss weight is 0 ({weights}); nothing would be trained")
    teacher_vae.eval()
    slim.train()
    log = []
    for s in leg_steps([VaePhase(crops, steps, batch_size, lr), *([tune] if tune else [])], slim.parameters(),
                       generator, "slim vae"):
        terms = _terms(teacher_vae, slim, s.x, generator, net, weights, train_latents)
        loss = sum(getattr(weights, k) * v for k, v in terms.items() if getattr(weights, k) > 0)
        optimizer_step(s.opt, loss, "slim vae", s.step, clip=slim, sched=s.sched)
        log.append({"step": s.step, "phase": s.phase, "loss": loss.item(), "perceptual": math.nan}
                   | {k: v.item() for k, v in terms.items()})
    slim.eval()
    return log


# --- Quality --------------------------------------------------------------------------------------


@torch.no_grad()
def latent_compat(teacher_vae: AutoencoderKL, slim: AutoencoderKL, latents: torch.Tensor, net=None,
                  batch: int = 32) -> dict[str, float]:
    """Both decoders on the same latents, in the pipeline's units (each VAE divides by its own scaling
    factor, as `StableDiffusionPipeline` does): PSNR (dB), SSIM, MS-SSIM and, with `net`, lpips_mnv2
    of the slim decode against the teacher's. Identical decodes give PSNR inf."""
    def decode(vae):
        return torch.cat([vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample
                          for i in range(0, len(latents), batch)])
    return paired(net, to_unit(decode(slim)), to_unit(decode(teacher_vae)))


def round_trip(vae: AutoencoderKL, images: torch.Tensor, net=None) -> dict[str, float]:
    """PSNR, SSIM, MS-SSIM (and lpips_mnv2) of encode-decode of [-1, 1] images against themselves."""
    return vae_quality(vae, images, net)


# --- Cost -----------------------------------------------------------------------------------------


def params(vae: AutoencoderKL) -> dict[str, int]:
    """Parameters of each half, the 1x1 quant convs counted with the half that runs them."""
    def count(*modules):  # quant convs are None in configs with use_(post_)quant_conv=False
        return sum(count_params(m) for m in modules if m is not None)
    enc, dec = count(vae.encoder, vae.quant_conv), count(vae.decoder, vae.post_quant_conv)
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def sd15_pair(name: str) -> tuple[AutoencoderKL, AutoencoderKL]:
    """SD-1.5's VAE and option `name` at SD-1.5 width, on the meta device: real shapes, no storage."""
    with torch.device("meta"):
        sd = AutoencoderKL(**SD15_VAE)
        return sd, AutoencoderKL(**slim_config(sd.config, name))


class _Decode(nn.Module):
    """latents -> image: the decoder half alone (post_quant_conv + decoder), as a pipeline runs it."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def decode_latency(vae: AutoencoderKL, latent_px: int, backend: str, threads: int, runs: int,
                   workdir: str | Path, name: str = "vae_decode", warmup: int = 2) -> float:
    """Median ms of one tile's decode (batch 1, `latent_px` latents) on 'torch' or 'onnxruntime'.

    A meta-device VAE (`sd15_pair`) is first rebuilt from its config with random weights: timing needs
    storage, not trained values. SD-1.5's full decoder at 64x64 latents takes seconds a run on 2 threads.
    """
    module, args = _decode_job(vae, latent_px)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return time_callable(backend, module, args, runs, threads, Path(workdir), name, warmup)


def _storage(vae: AutoencoderKL) -> AutoencoderKL:
    """`vae`, or for a meta-device VAE (`sd15_pair`) the same config with random weights: timing needs
    storage, not trained values."""
    if any(p.is_meta for p in vae.parameters()):
        return AutoencoderKL(**model_config(vae.config))
    return vae


def _decode_job(vae: AutoencoderKL, latent_px: int) -> tuple[nn.Module, tuple]:
    vae = _storage(vae)
    z = torch.randn(1, vae.config.latent_channels, latent_px, latent_px,
                    generator=torch.Generator().manual_seed(0))
    return _Decode(vae.eval()), (z,)


def _encode_job(vae: AutoencoderKL, image_px: int) -> tuple[nn.Module, tuple]:
    vae = _storage(vae)
    x = torch.rand(1, 3, image_px, image_px, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return _Encode(vae.eval()), (x,)


def tile_share(unet_ms: float, decode_ms: float) -> float:
    """The decode's share of one U-Net step plus one decode (a sampled tile's last step). One-step
    restoration also encodes every tile: stage 08 times the whole VAE's share of a restored tile."""
    return decode_ms / (unet_ms + decode_ms)


# --- The table to choose from ---------------------------------------------------------------------


def measure_options(teacher_vae: AutoencoderKL, crops: torch.Tensor, eval_images: torch.Tensor,
                    steps: int, batch_size: int, lr: float, weights: LossWeights, seed: int,
                    latent_px: int, backend: str, threads: int, runs: int, workdir: str | Path,
                    net=None, latents: torch.Tensor | None = None, names: list[str] | None = None,
                    train_latents: torch.Tensor | None = None):
    """One row per option (and the teacher): parameters, decode ms at `latent_px`, round-trip quality on
    `eval_images` and latent compatibility after `steps` of distillation.

    Compatibility is measured on `latents` (e.g. a U-Net's, in pipeline units) or else on the teacher's
    latents of `eval_images`. Each option trains on the same batches (one seed), with `train_latents`
    as `distill` takes them. An option whose config equals an earlier one at this width (e.g. `-l1` on
    a one-layer teacher) is not retrained: its row repeats that one's, with `same_as` naming it.
    Returns (DataFrame, {name: distilled slim VAE}).
    """
    import pandas as pd

    names = list(names or [o.name for o in OPTIONS])
    configs = {n: slim_config(teacher_vae.config, n) for n in names}  # every error before any training
    if latents is None:
        with torch.no_grad():
            latents = teacher_vae.encode(eval_images).latent_dist.mean * teacher_vae.config.scaling_factor
    rows = [{"option": "teacher", **params(teacher_vae),
             "decode_ms": decode_latency(teacher_vae, latent_px, backend, threads, runs, workdir, "teacher"),
             **round_trip(teacher_vae, eval_images, net), "compat_psnr": math.inf}]
    slims, seen = {}, {}
    for n in bar(names, desc="vae options"):
        key = repr(sorted(configs[n].items()))
        if key in seen:
            rows.append(dict(next(r for r in rows if r["option"] == seen[key]), option=n, same_as=seen[key]))
            slims[n] = slims[seen[key]]
            continue
        slim, _ = build(teacher_vae, n)
        log = distill(teacher_vae, slim, crops, steps, batch_size, lr, weights,
                      torch.Generator().manual_seed(seed), net, train_latents)
        compat = latent_compat(teacher_vae, slim, latents, net)
        rows.append({"option": n, **params(slim),
                     "decode_ms": decode_latency(slim, latent_px, backend, threads, runs, workdir, n),
                     **round_trip(slim, eval_images, net), "compat_psnr": compat["psnr"],
                     **({"compat_lpips_mnv2": compat["lpips_mnv2"]} if net is not None else {}),
                     "final_loss": log[-1]["loss"]})
        seen[key], slims[n] = n, slim
    frame = pd.DataFrame(rows)
    frame["param_ratio"] = frame["total"].iloc[0] / frame["total"]
    return frame, slims


class _Encode(nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.mean


def load(folder: str | Path) -> AutoencoderKL:
    """The slim VAE that stage 06 saved (`save_pretrained`)."""
    return AutoencoderKL.from_pretrained(folder).eval()


def costs(teacher_vae: AutoencoderKL, slim: AutoencoderKL, sd_teacher: AutoencoderKL, sd_slim: AutoencoderKL,
          latent_px: int, threads: int, runs: int, workdir: str | Path, sd15: bool = True,
          sd15_runs: int | None = None, seed: int = 0) -> dict:
    """Decode (and, at SD-1.5 width, encode) latency of teacher and slim VAE: at the study's tile on torch
    and ONNX Runtime; with `sd15`, at the SD tile (64x64 latents, 512 px) with random weights, decode on
    both backends and encode on torch (restoration encodes every tile).

    Each width's calls are timed in interleaved rounds (`timing.interleaved_timings`), so a slow phase
    of the machine lands on both VAEs rather than on whichever was timed during it; a speed-up is a
    ratio of the two. Study tile: median of `runs` rounds, one warm-up call per round. SD tile (seconds a
    call on 2 threads): median of `sd15_runs` rounds (default `runs`) with no separate warm-up, so the
    first round also warms every call; from 3 rounds on, the median is a warm call."""
    sd15_runs = runs if sd15_runs is None else sd15_runs
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {}

    def measure(jobs: dict, rounds: int, warmup: int, desc: str) -> None:
        with torch_threads(threads):
            calls = {"/".join(key): host_call(key[0], module, args, threads, workdir, "_".join(key))
                     for key, (module, args) in jobs.items()}
            timed = interleaved_timings(calls, rounds, 1, warmup=warmup, seed=seed, desc=desc)
        for item, ms in timed.groupby("item").ms.median().items():
            backend, width, model, what = item.split("/")
            out.setdefault(f"{width}_{backend}", {}).setdefault(model, {})[f"{what}_ms"] = float(ms)

    measure({(b, "embedded", k, "decode"): _decode_job(v, latent_px)
             for b in BACKENDS for k, v in (("teacher", teacher_vae), ("slim", slim))},
            runs, 1, "VAE timing, study tile")
    if sd15:
        real = {"teacher": _storage(sd_teacher).eval(), "slim": _storage(sd_slim).eval()}
        jobs = {(b, "sd15", k, "decode"): _decode_job(v, 64) for b in BACKENDS for k, v in real.items()}
        jobs |= {("torch", "sd15", k, "encode"): _encode_job(v, 512) for k, v in real.items()}
        measure(jobs, sd15_runs, 0, "VAE timing, SD-1.5 tile")
        del real, jobs
    out["provenance"] = {"threads": threads, "runs": runs, "batch": 1, **({"sd15_runs": sd15_runs} if sd15 else {}),
                         "timing": "interleaved rounds in shuffled order, per width; median over rounds",
                         "tiles": f"{latent_px}x{latent_px} latent (study), 64x64 latent / 512 px (SD-1.5)"}
    return out
