"""A student U-Net: the pruned base with one option per stage, as a diffusers model.

`NanoUNet` is a `ModelMixin` + `ConfigMixin`: `save_pretrained` / `from_pretrained` round-trip it with
safetensors, and it drops into `StableDiffusionPipeline` as `unet`. Its config is the pruned base's
(the fields below) plus the architecture id; the weights of a candidate come from the base through
`from_base`, which logs every copy.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from . import surgery
from .baseline import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS, count_params
from .blocks import DecoderStage, EncoderStage, LiteTransformer, SlimResnet
from .space import DECODERS, ENCODERS, STAGES, Arch

# Config fields shared with the pruned base's UNet2DConditionModel config.
BASE_FIELDS = ("sample_size", "in_channels", "out_channels", "block_out_channels",
               "cross_attention_dim", "attention_head_dim", "norm_num_groups", "norm_eps",
               "flip_sin_to_cos", "freq_shift", "time_cond_proj_dim")
_FIXED = ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out")


def _base_unet(cfg: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        down_block_types=SD15_DOWN_BLOCKS[:3], up_block_types=SD15_UP_BLOCKS[1:],
        mid_block_type=None, layers_per_block=2, **{k: cfg[k] for k in BASE_FIELDS})


def _slim(ratio: float, channels: int) -> int:
    return max(1, round(channels * ratio))


def build_stage(stage: str, option_index: int, base_block: nn.Module, cfg: dict) -> nn.Module:
    """One stage with the given option. Full layers reuse `base_block`'s modules (the caller owns
    them: pass a fresh block or a copy); slim and lite layers are freshly initialised."""
    from .space import options

    opt = options(stage)[option_index]
    groups, temb = cfg["norm_num_groups"], base_block.resnets[0].time_emb_proj.in_features
    resnets, attentions = [], []
    for resnet, attn in zip(base_block.resnets, base_block.attentions):
        if opt.resnet == 1.0:
            resnets.append(resnet)
        else:
            resnets.append(SlimResnet(resnet.conv1.in_channels, resnet.conv2.out_channels,
                                      _slim(opt.resnet, resnet.conv1.out_channels), temb, groups,
                                      eps=resnet.norm1.eps))
        if opt.attention == "full":
            attentions.append(attn)
        elif opt.attention == "lite":
            block = attn.transformer_blocks[0]
            attentions.append(LiteTransformer(attn.config.in_channels, block.attn2.heads,
                                              block.attn2.cross_attention_dim, attn.norm.num_groups))
        else:
            attentions.append(None)
    if stage in ENCODERS:
        down = base_block.downsamplers[0] if base_block.downsamplers else None
        return EncoderStage(resnets, attentions, down)
    up = base_block.upsamplers[0] if base_block.upsamplers else None
    return DecoderStage(resnets, attentions, up)


class NanoUNet(ModelMixin, ConfigMixin):
    """The pruned base (E1-E3, D3-D1) with the stage options named by `arch`."""

    @register_to_config
    def __init__(self, arch: str = "e000-d000", sample_size: int = 64, in_channels: int = 4,
                 out_channels: int = 4, block_out_channels: tuple = (320, 640, 1280),
                 cross_attention_dim: int = 768, attention_head_dim: int = 8,
                 norm_num_groups: int = 32, norm_eps: float = 1e-5, flip_sin_to_cos: bool = True,
                 freq_shift: int = 0, time_cond_proj_dim: int | None = None):
        super().__init__()
        parsed = Arch.parse(arch)
        base = _base_unet(dict(self.config))  # a scaffold: its modules are taken, not copied
        for name in _FIXED:
            setattr(self, name, getattr(base, name))
        self.stages = nn.ModuleDict({
            stage: build_stage(stage, choice, base.get_submodule(surgery.BASE_MODULES[stage]),
                               dict(self.config))
            for stage, choice in zip(STAGES, parsed.choices)})

    @property
    def arch(self) -> Arch:
        return Arch.parse(self.config.arch)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **extra):
        """UNet2DConditionModel's call, for the arguments SD-1.5's pipeline uses.

        The pipeline also passes `timestep_cond`, `cross_attention_kwargs`, `added_cond_kwargs`...
        as None; a value for any of them would change the result, so it is refused, not ignored."""
        given = sorted(k for k, v in extra.items() if v is not None)
        if given:
            raise TypeError(f"NanoUNet does not support {given}; it takes sample, timestep, "
                            "encoder_hidden_states and return_dict (the others must be None)")
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = (t[None] if t.ndim == 0 else t).to(sample.device).expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(dtype=sample.dtype))
        h = self.conv_in(sample)
        skips = [h]
        for stage in ENCODERS:
            h, new = self.stages[stage](h, temb, encoder_hidden_states)
            skips += new
        for stage in DECODERS:
            n = len(self.stages[stage].resnets)
            consumed, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None  # where the upsampler must land
            h = self.stages[stage](h, consumed, temb, encoder_hidden_states, upsample_size=size)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return UNet2DConditionOutput(sample=h) if return_dict else (h,)


def option_params(cfg: dict) -> dict:
    """Parameters of every (stage, option) and of the fixed parts, counted on the meta device.

    A candidate's size is then fixed + the sum of its options (checked against full builds in tests),
    which makes counting all 32,768 architectures a table lookup.
    """
    from .space import options

    with torch.device("meta"):
        base = _base_unet(cfg)
        table = {"fixed": sum(count_params(getattr(base, n)) for n in _FIXED)}
        for stage in STAGES:
            block = base.get_submodule(surgery.BASE_MODULES[stage])
            for i in range(len(options(stage))):
                table[stage, i] = count_params(build_stage(stage, i, copy.deepcopy(block), cfg))
    return table


def arch_params(table: dict, arch: Arch) -> int:
    return table["fixed"] + sum(table[s, c] for s, c in zip(STAGES, arch.choices))


def student_config(base: UNet2DConditionModel) -> dict:
    return {k: base.config[k] for k in BASE_FIELDS}


@torch.no_grad()
def from_base(base: UNet2DConditionModel, arch: Arch) -> tuple[NanoUNet, list[str]]:
    """A candidate initialised from the pruned base; the log names every copy, BK-SDM style.

    Full layers are copied exactly; slim resnets keep their strongest inner channels and lite
    transformers keep the base's cross-attention and strongest feed-forward units.
    """
    with torch.device("meta"):
        student = NanoUNet(arch=arch.id, **student_config(base))
    student = student.to_empty(device=base.device)
    if base.dtype != student.dtype:
        student = student.to(base.dtype)
    log = []
    for name in _FIXED:
        if list(getattr(student, name).parameters()):
            getattr(student, name).load_state_dict(getattr(base, name).state_dict())
            log.append(f"{name} <- base.{name}")
    for stage in STAGES:
        log += _copy_stage(base, stage, student.stages[stage])
    return student.eval(), log


@torch.no_grad()
def stage_from_base(base: UNet2DConditionModel, stage: str, option: int) -> nn.Module:
    """One stage of a candidate, initialised exactly as `from_base` initialises it inside the candidate,
    without building the other five stages (module distillation needs 30 of these)."""
    with torch.device("meta"):
        block = copy.deepcopy(base.get_submodule(surgery.BASE_MODULES[stage])).to("meta")
        stage_module = build_stage(stage, option, block, student_config(base))
    stage_module = stage_module.to_empty(device=base.device).to(base.dtype)
    _copy_stage(base, stage, stage_module)
    return stage_module.eval()


def _copy_stage(base: UNet2DConditionModel, stage: str, dst: nn.Module) -> list[str]:
    """Fill every layer of `dst` (one stage) from the base's block; returns one log line per layer."""
    src_name = surgery.BASE_MODULES[stage]
    src, log = base.get_submodule(src_name), []
    for kind in ("resnets", "attentions", "downsamplers" if stage in ENCODERS else "upsamplers"):
        for j, (s, d) in enumerate(zip(getattr(src, kind, None) or [], getattr(dst, kind))):
            where = f"stages.{stage}.{kind}.{j} <- base.{src_name}.{kind}.{j}"
            if isinstance(d, nn.Identity):
                log.append(f"stages.{stage}.{kind}.{j}: removed (base.{src_name}.{kind}.{j})")
            elif isinstance(d, (SlimResnet, LiteTransformer)):
                log.append(f"{where}: " + "; ".join(d.init_from(s)))
            else:
                d.load_state_dict(s.state_dict())
                log.append(where)
    return log


def load_any(path: str | Path):
    """A saved U-Net of either kind: a NanoUNet (family member) or a UNet2DConditionModel (teacher,
    pruned base, baselines), chosen by the `_class_name` its config records."""
    if NanoUNet.load_config(path).get("_class_name") == "NanoUNet":
        return load(path)
    return UNet2DConditionModel.from_pretrained(path).eval()


def load(path: str | Path) -> NanoUNet:
    """`from_pretrained`, with a clear error when the config's architecture does not fit the weights."""
    try:
        return NanoUNet.from_pretrained(path).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        cfg = NanoUNet.load_config(path)
        raise ValueError(f"{path}: weights do not match config arch {cfg.get('arch')!r} "
                         f"({str(err).splitlines()[0][:300]})") from err
