"""Hardware-aware surgery: remove E4, Mid and D4 from an SD-1.5-topology U-Net.

The pruned *base* is itself a diffusers `UNet2DConditionModel` (three down blocks, no mid block, three
up blocks), so it keeps the teacher's forward signature and output type. Its weights come from the
teacher through an explicit, logged prefix map.

Why E3 also loses its downsampler: in SD-1.5 that downsampler's only consumer is D4 (its output is the
skip D4's first resnet concatenates). With D4 gone, D3 takes E3's output at E3's own resolution, which is
exactly the resolution D4 used to hand it; BK-SDM-Tiny's three-stage U-Net is wired the same way.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .baseline import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS, count_params, model_config

# Stage -> (module in the teacher, layer pattern, fate). R = resnet, A = transformer (attention).
STAGE_MAP = {
    "E1": ("down_blocks.0", "R-A-R-A + downsample", "kept"),
    "E2": ("down_blocks.1", "R-A-R-A + downsample", "kept"),
    "E3": ("down_blocks.2", "R-A-R-A + downsample", "kept, without its downsampler (fed D4)"),
    "E4": ("down_blocks.3", "R-R", "removed"),
    "Mid": ("mid_block", "R-A-R", "removed"),
    "D4": ("up_blocks.0", "R-R-R + upsample", "removed"),
    "D3": ("up_blocks.1", "R-A-R-A-R-A + upsample", "kept"),
    "D2": ("up_blocks.2", "R-A-R-A-R-A + upsample", "kept"),
    "D1": ("up_blocks.3", "R-A-R-A-R-A", "kept"),
}
REMOVED = ("E4", "Mid", "D4")
# Stage -> its module in the pruned base.
BASE_MODULES = {"E1": "down_blocks.0", "E2": "down_blocks.1", "E3": "down_blocks.2",
                "D3": "up_blocks.0", "D2": "up_blocks.1", "D1": "up_blocks.2"}
# Teacher prefix -> base prefix; everything else (conv_in, time_embedding, conv_out...) keeps its name.
PREFIX_MAP = {"down_blocks.0.": "down_blocks.0.", "down_blocks.1.": "down_blocks.1.",
              "down_blocks.2.": "down_blocks.2.", "up_blocks.1.": "up_blocks.0.",
              "up_blocks.2.": "up_blocks.1.", "up_blocks.3.": "up_blocks.2."}
DROPPED_PREFIXES = ("down_blocks.3.", "mid_block.", "up_blocks.0.", "down_blocks.2.downsamplers.")

# The teacher family the surgery understands (SD-1.5's, at any width).
_REQUIRED = {"down_block_types": SD15_DOWN_BLOCKS, "up_block_types": SD15_UP_BLOCKS,
             "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn"}


def check_teacher(config) -> None:
    """Refuse a U-Net whose topology is not SD-1.5's, naming the config key that differs."""
    for key, want in _REQUIRED.items():
        got = config[key] if isinstance(config, dict) else getattr(config, key)
        got = tuple(got) if isinstance(got, list) else got
        if got != want:
            raise ValueError(f"U-Net config {key}={got!r}; the surgery needs SD-1.5's {want!r}")


def base_config(teacher_config) -> dict:
    """The pruned base's config: the teacher's, minus the deepest stage and the mid block."""
    check_teacher(teacher_config)
    cfg = model_config(teacher_config)
    cfg["down_block_types"] = tuple(cfg["down_block_types"][:3])
    cfg["up_block_types"] = tuple(cfg["up_block_types"][1:])
    cfg["block_out_channels"] = tuple(cfg["block_out_channels"][:3])
    cfg["mid_block_type"] = None
    for key, value in cfg.items():  # per-block lists (e.g. attention_head_dim) lose E4's entry
        if isinstance(value, (list, tuple)) and len(value) == 4 and key.endswith(("_dim", "_block")):
            cfg[key] = tuple(value[:3])
    return cfg


def map_key(teacher_key: str) -> str | None:
    """The base's name for a teacher weight, or None if the surgery drops it."""
    if teacher_key.startswith(DROPPED_PREFIXES):
        return None
    for src, dst in PREFIX_MAP.items():
        if teacher_key.startswith(src):
            return dst + teacher_key[len(src):]
    return teacher_key


def prune(teacher_unet: UNet2DConditionModel) -> tuple[UNet2DConditionModel, list[str]]:
    """The pruned base with every kept teacher weight copied; returns it and the copy log."""
    base = UNet2DConditionModel(**base_config(teacher_unet.config))
    teacher_sd = teacher_unet.state_dict()
    mapped, log = {}, []
    for key, value in teacher_sd.items():
        new = map_key(key)
        if new is not None:
            mapped[new] = value
    base.load_state_dict(mapped, strict=True)  # every base weight has exactly one teacher source
    for src, dst in PREFIX_MAP.items():
        log.append(f"base.{dst} <- teacher.{src}")
    log += [f"dropped teacher.{p}" for p in DROPPED_PREFIXES]
    if base.dtype != teacher_unet.dtype:
        base = base.to(teacher_unet.dtype)
    return base.to(teacher_unet.device).eval(), log


def stage_params(unet: UNet2DConditionModel) -> dict[str, int]:
    """Parameters per stage of a full-topology U-Net, plus the fixed parts around the stages."""
    out = {}
    for stage, (module, _, _) in STAGE_MAP.items():
        out[stage] = count_params(unet.get_submodule(module))
    out["fixed"] = count_params(unet) - sum(out.values())
    return out


def stage_flops(unet: UNet2DConditionModel, latent_px: int, text_len: int) -> dict[str, int]:
    """Forward FLOPs per stage (one sample) counted by torch's FlopCounterMode, on any device."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    device = next(unet.parameters()).device
    sample = torch.zeros(1, cfg.in_channels, latent_px, latent_px, device=device)
    text = torch.zeros(1, text_len, cfg.cross_attention_dim, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, torch.tensor([500], device=device), encoder_hidden_states=text)
    per_module = counter.get_flop_counts()
    top = type(unet).__name__
    out = {stage: int(sum(per_module.get(f"{top}.{module}", {}).values()))
           for stage, (module, _, _) in STAGE_MAP.items()}
    out["fixed"] = int(sum(per_module.get(top, {}).values())) - sum(out.values())
    return out


def load_base(folder) -> UNet2DConditionModel:
    """A pruned base saved with `save_pretrained` (the healed one lives in data/students/base)."""
    return UNet2DConditionModel.from_pretrained(folder).eval()


def pruned_sd15() -> UNet2DConditionModel:
    """SD-1.5's pruned base from its real config; build it under `torch.device("meta")` to count."""
    from .baseline import SD15_UNET

    with torch.device("meta"):
        cfg = base_config(UNet2DConditionModel(**SD15_UNET).config)
    return UNet2DConditionModel(**cfg)
