"""The layers a stage option is made of, and the two stage containers.

A stage is a list of layers, each a residual block optionally followed by an attention block:
- `R`: diffusers' `ResnetBlock2D`, as in the teacher;
- `SlimResnet`: the same block with a narrower inner width (structured slimming: fewer channels
  between its two 3x3 convolutions, dense convolutions that NPUs run well);
- `A`: diffusers' `Transformer2DModel`, as in the teacher (self-attention, cross-attention, GEGLU FF);
- `LiteTransformer`: cross-attention and a 1x GEGLU feed-forward only; self-attention, quadratic in
  the number of tokens, is dropped.
Every form keeps its layer's input and output shapes, so any option plugs into any neighbour.
"""
from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


def inner_groups(inner: int, full: int, groups: int) -> int:
    """GroupNorm groups for a slimmed width: the teacher's channels per group are kept (SD-1.5: 320
    channels in 32 groups of 10, so a quarter-width 80 gets 8 groups of 10), so a group normalises
    the same kind of slice it did in the teacher."""
    per_group, rest = divmod(full, groups)
    if rest or inner % per_group:
        raise ValueError(f"a slim resnet of {inner} inner channels cannot keep the teacher's "
                         f"{full}/{groups} = {full / groups:g} channels per GroupNorm group; choose "
                         f"widths whose slim fractions are multiples of {max(per_group, 1)}")
    return inner // per_group


class SlimResnet(nn.Module):
    """ResnetBlock2D (SD's default: scale-shift off, swish, output scale 1) with inner width `inner`."""

    def __init__(self, in_ch: int, out_ch: int, inner: int, temb_ch: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)  # on the full input: the teacher's norm
        self.conv1 = nn.Conv2d(in_ch, inner, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, inner)
        self.norm2 = nn.GroupNorm(inner_groups(inner, out_ch, groups), inner, eps=eps)
        self.conv2 = nn.Conv2d(inner, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)

    @torch.no_grad()
    def init_from(self, full) -> list[str]:
        """Copy a full ResnetBlock2D, keeping the inner channels whose conv1 filters weigh most."""
        keep = full.conv1.weight.abs().sum((1, 2, 3)).topk(self.conv1.out_channels).indices.sort().values
        self.norm1.load_state_dict(full.norm1.state_dict())
        self.conv1.weight.copy_(full.conv1.weight[keep])
        self.conv1.bias.copy_(full.conv1.bias[keep])
        self.time_emb_proj.weight.copy_(full.time_emb_proj.weight[keep])
        self.time_emb_proj.bias.copy_(full.time_emb_proj.bias[keep])
        self.norm2.weight.copy_(full.norm2.weight[keep])
        self.norm2.bias.copy_(full.norm2.bias[keep])
        self.conv2.weight.copy_(full.conv2.weight[:, keep])
        self.conv2.bias.copy_(full.conv2.bias)
        if self.conv_shortcut is not None:
            self.conv_shortcut.load_state_dict(full.conv_shortcut.state_dict())
        return [f"{len(keep)}/{full.conv1.out_channels} inner channels (largest conv1 L1)"]


class LiteTransformer(nn.Module):
    """Transformer2DModel without self-attention and with a 1x (not 4x) GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, cross_dim: int, groups: int, ff_mult: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_dim, heads=heads,
                               dim_head=dim // heads, out_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = t + self.attn2(self.norm2(t), encoder_hidden_states=text)
        t = t + self.ff(self.norm3(t))
        return self.proj_out(t.reshape(b, h, w, c).permute(0, 3, 1, 2)) + x

    @torch.no_grad()
    def init_from(self, full) -> list[str]:
        """Copy a Transformer2DModel's norm, projections, cross-attention and the strongest FF units."""
        if getattr(full.config, "use_linear_projection", False):
            raise NotImplementedError("LiteTransformer copies conv projections (SD-1.5's); this "
                                      "teacher uses linear ones")
        block = full.transformer_blocks[0]
        for name in ("norm", "proj_in", "proj_out"):
            getattr(self, name).load_state_dict(getattr(full, name).state_dict())
        for name in ("norm2", "attn2", "norm3"):
            getattr(self, name).load_state_dict(getattr(block, name).state_dict())
        src_in, src_out = block.ff.net[0].proj, block.ff.net[2]
        dst_in, dst_out = self.ff.net[0].proj, self.ff.net[2]
        inner, width = src_out.in_features, dst_out.in_features
        keep = src_out.weight.abs().sum(0).topk(width).indices.sort().values
        rows = torch.cat([keep, keep + inner])  # GEGLU: value half, then gate half
        dst_in.weight.copy_(src_in.weight[rows])
        dst_in.bias.copy_(src_in.bias[rows])
        dst_out.weight.copy_(src_out.weight[:, keep])
        dst_out.bias.copy_(src_out.bias)
        return ["self-attention dropped", f"{width}/{inner} feed-forward units (largest out-proj L1)"]


def _attend(attn: nn.Module, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    if isinstance(attn, nn.Identity):  # the layer has no attention
        return h
    if isinstance(attn, LiteTransformer):
        return attn(h, text)
    return attn(h, encoder_hidden_states=text, return_dict=False)[0]


class EncoderStage(nn.Module):
    """E1..E3: (resnet, attention?) x 2, then an optional downsampler; every layer emits a skip."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module | None],
                 downsampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([a or nn.Identity() for a in attentions])
        self.downsamplers = nn.ModuleList([downsampler] if downsampler is not None else [])

    def forward(self, h, temb, text):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = _attend(attn, resnet(h, temb), text)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class DecoderStage(nn.Module):
    """D3..D1: (concat a skip, resnet, attention?) x 3, then an optional upsampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module | None],
                 upsampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([a or nn.Identity() for a in attentions])
        self.upsamplers = nn.ModuleList([upsampler] if upsampler is not None else [])

    def forward(self, h, skips, temb, text, upsample_size=None):
        skips = list(skips)
        for resnet, attn in zip(self.resnets, self.attentions):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            h = _attend(attn, h, text)
        for up in self.upsamplers:
            h = up(h, upsample_size)
        return h
