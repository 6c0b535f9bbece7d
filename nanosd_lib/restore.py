"""One-step photo restoration in the OSEDiff manner, with any backbone of the study.

The low-quality image goes through the VAE encoder; its latent is treated as the noisy latent at one
fixed timestep; the U-Net predicts once, which gives a clean latent; the VAE decoder returns the image.
No sampling loop, no noise: one U-Net evaluation per tile, the cost the seed's tiling numbers assume.

Each backbone is fine-tuned the same number of steps on degraded crops of the train split (full
fine-tuning of the U-Net; the VAE stays frozen, gradients flow through its decoder), with L2 plus the
LPIPS-style MobileNetV2 distance. `restore_photo` then runs on a photo of any size, tile by tile.
Stage 08 saves the fine-tuned restorers under data/restorers/TASK/BACKBONE; one call restores a file:

    python -m nanosd_lib.restore photo.jpg restored.png --restorer data/restorers/sr_x4/prime

or, in Python, `restore.restore_file(folder, "photo.jpg", "restored.png")`, or
`restore.restore_photo(restorer, photo, tile=128, overlap=32)` on a [1, 3, H, W] tensor in [0, 1].
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import degrade, tiling
from .progress import bar
from .quality import lpips_mnv2
from .training import adamw, optimizer_step

TASKS = ("sr_x4", "denoise")


@dataclass(frozen=True)
class FineTune:
    steps: int  # optimizer steps, the same for every backbone
    batch_size: int  # crops per step
    crop_px: int  # HQ crop side (a multiple of 8 and of 4): convolutional, so small crops suffice
    lr: float  # AdamW learning rate, cosine-decayed
    perceptual_weight: float  # weight of lpips_mnv2 beside the L2 term
    timestep: int  # the fixed timestep the LQ latent is read at


def encode(vae, image: torch.Tensor) -> torch.Tensor:
    """A [0, 1] image to its scaled latent (the posterior mean, as a one-step restorer reads it)."""
    return vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """A scaled latent to its image in [0, 1] (not clamped: training sees the overshoot)."""
    return vae.decode(latent / vae.config.scaling_factor).sample.add(1).div(2)


class Restorer(nn.Module):
    """VAE encoder -> U-Net once at `timestep` -> clean latent -> VAE decoder; images in [0, 1]."""

    def __init__(self, vae, unet, scheduler_config, text: torch.Tensor, timestep: int):
        super().__init__()
        from diffusers import DDPMScheduler

        self.vae, self.unet = vae, unet
        self.scheduler_config = dict(scheduler_config)
        sched = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction = sched.config.prediction_type
        alpha = sched.alphas_cumprod[timestep]
        self.register_buffer("text", text)  # [1, L, D]: the empty prompt, restoration has no caption
        self.register_buffer("t", torch.tensor([timestep]))
        self.a, self.s = float(alpha.sqrt()), float((1 - alpha).sqrt())

    def clean_latent(self, z: torch.Tensor) -> torch.Tensor:
        pred = self.unet(z, self.t.expand(len(z)), encoder_hidden_states=self.text.expand(len(z), -1, -1)).sample
        if self.prediction == "v_prediction":  # x0 = a z - s v
            return self.a * z - self.s * pred
        return (z - self.s * pred) / max(self.a, 1e-4)  # epsilon: x0 = (z - s eps) / a

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, self.clean_latent(encode(self.vae, lq)))


def make_lq(hq: torch.Tensor, task: str, generator: torch.Generator) -> torch.Tensor:
    """The restorer's input for a [0, 1] HQ batch: x4 second-order degraded and bicubic upsampled back
    to HQ size (OSEDiff's input), or noisy at sigma 25/255, unclipped as the denoising benchmarks add it
    (`degrade.denoise`)."""
    if task == "sr_x4":
        return sr_views(hq, generator)[1]
    if task == "denoise":
        return degrade.denoise(hq, generator)
    raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")


def sr_views(hq: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The x4 LQ image shown at HQ size with nearest pixels (what the camera gave), and its bicubic
    upsampling (the restorer's input and the bicubic reference), from one draw of `generator`."""
    small = degrade.sr_x4(hq, generator)
    size = hq.shape[-2:]
    return F.interpolate(small, size=size, mode="nearest"), degrade.bicubic_up(small, size)


def fine_tune(restorer: Restorer, crops: torch.Tensor, task: str, cfg: FineTune, net,
              generator: torch.Generator) -> list[dict]:
    """Train the U-Net of `restorer` on (degraded, clean) pairs of [0, 1] crops; logs both terms."""
    restorer.vae.requires_grad_(False).eval()
    unet = restorer.unet.train().requires_grad_(True)
    opt = adamw(unet.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    log, start = [], time.perf_counter()
    for step in bar(range(cfg.steps), desc=f"fine-tune {task}"):
        hq = crops[torch.randint(len(crops), (cfg.batch_size,), generator=generator)]
        out = restorer(make_lq(hq, task, generator))
        l2 = F.mse_loss(out, hq)
        perceptual = lpips_mnv2(net, out.clamp(0, 1), hq).mean()
        loss = l2 + cfg.perceptual_weight * perceptual
        optimizer_step(opt, loss, f"restoration fine-tuning ({task})", step, clip=unet, sched=sched)
        log.append({"step": step, "l2": l2.item(), "lpips_mnv2": perceptual.item(),
                    "seconds": time.perf_counter() - start})
    unet.eval().requires_grad_(False)
    return log


@torch.no_grad()
def restore_photo(restorer: nn.Module, photo: torch.Tensor, tile: int, overlap: int, batch: int = 8) -> torch.Tensor:
    """Restore a [1, 3, H, W] photo in [0, 1] of any size, tile by tile with feathered blending; `restorer` is
    any module from [0, 1] tiles to tiles of the same size (a `Restorer`, or a `VaeAlone` for reference)."""
    return tiling.restore_tiled(photo, lambda x: restorer(x).clamp(0, 1), tile, overlap, batch=batch).clamp(0, 1)


def degrade_and_restore(restorers: dict[tuple[str, str], nn.Module], photos: dict[str, torch.Tensor], seed: int,
                        tile: int, overlap: int, same: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Every photo degraded once per task, the i-th by a generator seeded `seed + i` (the same input for
    every restorer of that task), then restored by each restorer, the whole photo tile by tile.

    `restorers` are keyed (task, name); `same` ({name: representative}, as `family.same_as` gives)
    restores a repeated model once and shares its output. Returns the LQ inputs {(task, photo): image}
    and the outputs {(task, name, photo): image}."""
    same = same or {}
    tasks = dict.fromkeys(task for task, _ in restorers)
    lq = {(task, n): make_lq(hq, task, torch.Generator().manual_seed(seed + i))
          for task in tasks for i, (n, hq) in enumerate(photos.items())}
    out = {}
    for task, name in restorers:
        rep = same.get(name, name)
        for n in photos:
            if (task, rep, n) not in out:
                out[task, rep, n] = restore_photo(restorers[task, rep], lq[task, n], tile, overlap)
            out[task, name, n] = out[task, rep, n]
    return lq, out


# --- The parts of a tile, each timed alone beside the whole restorers ------------------------------


class VaeAlone(nn.Module):
    """A restorer without its U-Net: LQ -> VAE encoder -> decoder, images in [0, 1]. Timed beside the
    restorers, it is the part of a tile that no U-Net behind this VAE can speed up; scored beside them
    (stage 08), it is what a restorer whose U-Net step changed nothing would give."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, encode(self.vae, lq))


class UnetAlone(nn.Module):
    """A restorer's U-Net step alone: scaled latent -> clean latent, no VAE. Per tile, this is what the
    seed's device figures count (`measure_baseline_cost.device_tile_ms`: the U-Net only).

    It holds the whole restorer, so its `parameters()` include the VAE's; an ONNX export keeps only the
    weights the forward uses, the U-Net's."""

    def __init__(self, restorer: Restorer):
        super().__init__()
        self.restorer = restorer

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.restorer.clean_latent(latent)

    @torch.no_grad()
    def tile_input(self, tile: torch.Tensor) -> torch.Tensor:
        """What it takes for a [1, 3, H, W] tile in [0, 1]: that tile's latent, from the restorer's encoder."""
        return encode(self.restorer.vae, tile)


def tile_latency(restorers: dict, names: list[str], task: str, tile: int, threads: int, runs: int,
                 workdir, rounds: int = 4, seed: int = 0, extra: dict | None = None) -> dict[str, float]:
    """Median ms of one tile through each restorer (encoder + U-Net + decoder) on ONNX Runtime, and
    through each part in `extra` ({name: module}) in the same rounds. Every module takes the tile,
    except one with a `tile_input` method (a `UnetAlone`), which takes what that method gives for it.

    Everything is timed interleaved, in `rounds` shuffled rounds of `runs` calls each after two warm-up
    calls (the latency tables take one), and each keeps its median over rounds: a slow phase of the
    machine then lands on all of them rather than on whichever was timed during it."""
    from .timing import interleaved_timings, onnx_file, onnx_session

    x = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    modules = {**{name: restorers[task, name] for name in names}, **(extra or {})}
    calls = {name: onnx_session(m.eval(), (m.tile_input(x) if hasattr(m, "tile_input") else x,),
                                onnx_file(workdir, name), threads)
             for name, m in bar(modules.items(), desc="tile latency: export")}
    timings = interleaved_timings(calls, rounds, runs, 2, seed, desc=f"tile latency: {rounds} rounds")
    return timings.groupby("item").ms.median().to_dict()


def seed_photo_cost(vae_costs: dict, prime_id: str, photo, threads: int, runs: int) -> dict[str, dict]:
    """Seconds per seed photo (4000x3000 in 512-px tiles) at SD-1.5 width: tiles x (one U-Net step +
    the VAE's round trip). U-Nets are SD-1.5-width random-weight models timed here (torch eager); the
    VAE times come from stage 06 (`vae_costs`); the seed's own device figure is cited beside them."""
    from diffusers import UNet2DConditionModel

    from . import student, surgery
    from .baseline import SD15_UNET, tile_grid
    from .space import Arch
    from .timing import unet_forward_ms

    if "sd15_torch" not in vae_costs:  # before a minute of timing SD-1.5-width U-Nets
        raise KeyError("the slim VAE's costs.json has no SD-1.5-width timings: set slim_vae.sd15_timing "
                       "to true and rerun slim_vae, or restore_photos.seed_photo to false")
    grid = tile_grid(photo.image_width, photo.image_height, photo.tile_px, photo.overlap_px)
    torch.manual_seed(0)
    with torch.no_grad():
        teacher = UNet2DConditionModel(**SD15_UNET).eval()
        unet_ms = {"teacher": unet_forward_ms(teacher, 64, 77, runs, threads)}
        del teacher
        base = surgery.pruned_sd15().eval()
        prime = student.from_base(base, Arch.parse(prime_id))[0]
        del base
        unet_ms["prime"] = unet_forward_ms(prime, 64, 77, runs, threads)
    vae_ms = {k: v["encode_ms"] + v["decode_ms"] for k, v in vae_costs["sd15_torch"].items()}
    rows = {"teacher": (unet_ms["teacher"], vae_ms["teacher"]), "prime": (unet_ms["prime"], vae_ms["teacher"]),
            "prime+slim_vae": (unet_ms["prime"], vae_ms["slim"])}
    out = {k: {"tiles": grid.count, "unet_ms": u, "vae_ms": v, "image_s": grid.count * (u + v) / 1e3,
               "source": f"host CPU, torch eager, {threads} threads, SD-1.5 width, random weights"}
           for k, (u, v) in rows.items()}
    out["seed (cited)"] = {"tiles": grid.count, "unet_ms": photo.device_tile_ms, "vae_ms": float("nan"),
                           "image_s": grid.count * photo.device_tile_ms / 1e3,
                           "source": "seed article: SD-1.5 int4 on the SM8750 NPU, U-Net only"}
    return out


# --- A fine-tuned restorer on disk, and a photo file in, a photo file out ---------------------------


def save(restorer: Restorer, folder: str | Path, task: str, tile: int, overlap: int) -> Path:
    """Write `restorer` as diffusers folders (vae/, unet/), its empty-prompt embedding and restorer.json
    (task, timestep, scheduler, and the tile and overlap it was evaluated with), so `load` rebuilds it."""
    import json

    from safetensors.torch import save_file

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    restorer.vae.save_pretrained(folder / "vae")
    restorer.unet.save_pretrained(folder / "unet")
    save_file({"text": restorer.text.contiguous()}, str(folder / "text.safetensors"))
    meta = {"task": task, "timestep": int(restorer.t.item()), "tile_px": tile, "overlap_px": overlap,
            "scheduler": restorer.scheduler_config}
    (folder / "restorer.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # floats exact
    return folder


def load(folder: str | Path) -> tuple[Restorer, dict]:
    """A restorer that stage 08 saved (`data/restorers/TASK/BACKBONE`): (restorer, its restorer.json)."""
    import json

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from .student import load_any

    folder = Path(folder)
    if not (folder / "restorer.json").is_file():
        raise FileNotFoundError(f"{folder} holds no restorer.json: run the restore_photos stage, or pass a "
                                "folder under data/restorers/")
    meta = json.loads((folder / "restorer.json").read_text())
    restorer = Restorer(AutoencoderKL.from_pretrained(folder / "vae").eval(), load_any(folder / "unet"),
                        meta["scheduler"], load_file(str(folder / "text.safetensors"))["text"], meta["timestep"])
    return restorer.eval(), meta


@torch.no_grad()
def restore_file(folder: str | Path, source: str | Path, target: str | Path, tile: int | None = None,
                 overlap: int | None = None) -> torch.Tensor:
    """Restore the photo file `source` (any size) into `target` (PNG) with the restorer in `folder`.

    For x4 super-resolution `source` is the low-resolution photo: it is upsampled x4 (bicubic) first,
    as in training, so `target` is 4 times its size. Tile and overlap default to the restorer's own.
    Returns the restored [1, 3, H, W] image in [0, 1]."""
    from torchvision.io import ImageReadMode, decode_image, write_png
    from torchvision.transforms.v2.functional import to_dtype

    restorer, meta = load(folder)
    photo = decode_image(str(source), mode=ImageReadMode.RGB, apply_exif_orientation=True)  # uint8 or uint16
    photo = to_dtype(photo, torch.float32, scale=True).unsqueeze(0)
    if meta["task"] == "sr_x4":
        photo = degrade.bicubic_up(photo, (4 * photo.shape[-2], 4 * photo.shape[-1]))
    out = restore_photo(restorer, photo, tile or meta["tile_px"], overlap if overlap is not None else
                        meta["overlap_px"])
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    write_png(out[0].mul(255).round().to(torch.uint8), str(target))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanosd_lib.restore",
                                     description="Restore one photo of any size, tile by tile.")
    parser.add_argument("source", help="the photo to restore (for sr_x4: the low-resolution one)")
    parser.add_argument("target", help="where the restored PNG goes")
    parser.add_argument("--restorer", default="data/restorers/sr_x4/prime",
                        help="a folder that the restore_photos stage wrote (default: %(default)s)")
    parser.add_argument("--tile", type=int, help="tile side in pixels (default: the restorer's)")
    parser.add_argument("--overlap", type=int, help="tile overlap in pixels (default: the restorer's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    from .timing import torch_threads

    t0 = time.perf_counter()
    with torch_threads(args.threads):
        out = restore_file(args.restorer, args.source, args.target, args.tile, args.overlap)
    print(f"{args.target}: {out.shape[-1]}x{out.shape[-2]} in {time.perf_counter() - t0:.1f} s "
          f"({args.restorer}, {args.threads} threads)")


if __name__ == "__main__":
    main()
