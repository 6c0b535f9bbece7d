"""Why NanoSD exists: what tiling a 12 MP photo through SD-1.5 costs.

SD-1.5's real configs are facts that need no weights: diffusers builds them on the meta device, so the
parameter counts below are exact, with nothing downloaded and no memory allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# SD-1.5's U-Net block types, E1..E4 and D4..D1: the topology every teacher here has, at any width.
SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# SD-1.5's configs, as published in its unet/, vae/ and text_encoder/ config.json files.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=SD15_DOWN_BLOCKS, up_block_types=SD15_UP_BLOCKS,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

# Bytes per weight at each storage precision.
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class TileGrid:
    width: int
    height: int
    tile: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _count(self, side: int) -> int:
        return 1 if side <= self.tile else math.ceil((side - self.tile) / self.stride) + 1

    @property
    def cols(self) -> int:
        return self._count(self.width)

    @property
    def rows(self) -> int:
        return self._count(self.height)

    @property
    def count(self) -> int:
        return self.cols * self.rows

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every tile; the last row and column are flush with the edge."""
        def starts(side, n):
            return [min(i * self.stride, side - self.tile) for i in range(n)] if side > self.tile else [0]
        return [(x, y, x + self.tile, y + self.tile)
                for y in starts(self.height, self.rows) for x in starts(self.width, self.cols)]


def tile_grid(width: int, height: int, tile: int, overlap: int) -> TileGrid:
    if overlap >= tile:
        raise ValueError(f"measure_baseline_cost.overlap_px ({overlap}) must be below tile_px ({tile})")
    return TileGrid(width, height, tile, overlap)


def sd15_on_meta() -> dict[str, torch.nn.Module]:
    """SD-1.5's U-Net, VAE and text encoder with their real shapes and no storage."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}


def model_config(config) -> dict:
    """A diffusers config as constructor arguments: without the `_class_name`, `_diffusers_version`
    and other bookkeeping keys that `save_pretrained` adds."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def count_params(module: torch.nn.Module) -> int:
    """diffusers' `num_parameters()`, also for a plain nn.Module such as one stage of a U-Net."""
    from diffusers import ModelMixin

    return ModelMixin.num_parameters(module)


def memory_table(params: int) -> dict[str, float]:
    """Weight memory in GB (10^9 bytes) at each precision; activations come on top."""
    return {name: params * nbytes / 1e9 for name, nbytes in PRECISION_BYTES.items()}


def draw_tiles(ax, grid: TileGrid, image=None) -> None:
    """Draw the tile layout over the photo (or an empty frame), overlaps shaded darker."""
    import matplotlib.patches as patches

    if image is not None:
        ax.imshow(image, extent=(0, grid.width, grid.height, 0))
    for i, (l, t, r, b) in enumerate(grid.boxes()):
        ax.add_patch(patches.Rectangle((l, t), r - l, b - t, fill=True, alpha=0.12,
                                       edgecolor="crimson", facecolor="crimson", lw=0.8))
        ax.text((l + r) / 2, (t + b) / 2, str(i + 1), ha="center", va="center", fontsize=6)
    ax.grid(False)
    ax.set_xlim(0, grid.width)
    ax.set_ylim(grid.height, 0)
    ax.set_aspect("equal")
    ax.set_title(f"{grid.width}x{grid.height} in {grid.cols}x{grid.rows} = {grid.count} tiles "
                 f"of {grid.tile} px, {grid.overlap} px overlap")
