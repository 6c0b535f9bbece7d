"""The teacher: SD-1.5's exact block topology at a chosen width, built, trained, saved and loaded.

At the `embedded` and `smoke` scales the pipeline builds the teacher itself (diffusers' own
`UNet2DConditionModel`, `AutoencoderKL`, a small `CLIPTextModel`) and trains the VAE and U-Net on crops
of the bundled photos. At the `sd15` scale the same `load` reads a local diffusers folder instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .baseline import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS, count_params

# SD-1.5's noise schedule (its scheduler/scheduler_config.json) ...
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1)
# ... rescaled to zero terminal SNR, with v-prediction, for the teachers trained here. SD-1.5's last
# step still shows 7% of the image, so a model can read the picture's mean colour off the noise instead
# of the prompt; sampling from pure noise then lands on the average colour whatever the prompt. Measured
# on the embedded teacher: prompt separation 0.88 with SD's schedule, 2.7 with this one.
EMBEDDED_SCHEDULE = dict(SD15_SCHEDULE, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                         timestep_spacing="trailing")


WORD_VECTOR_STD = 1.0  # the frozen text encoder's word vectors (CLIP initialises them at 0.02)


@dataclass(frozen=True)
class ScaleSpec:
    unet_widths: tuple[int, ...]  # block_out_channels of E1..E4 (SD-1.5: 320, 640, 1280, 1280)
    heads: int  # attention heads per transformer (diffusers' attention_head_dim; SD-1.5: 8)
    norm_groups: int  # GroupNorm groups; SD-1.5 uses 32, fewer keep >=4 channels a group here
    text_dim: int  # text hidden size = cross_attention_dim (SD-1.5: 768)
    text_len: int  # tokens per prompt (SD-1.5: 77); our captions fit in 8
    text_layers: int  # CLIP text transformer layers (SD-1.5: 12)
    latent_px: int  # latent side; images are 8x larger (SD-1.5: 64 -> 512 px)
    vae_widths: tuple[int, ...]  # AutoencoderKL block_out_channels (SD-1.5: 128, 256, 512, 512)
    vae_layers: int  # resnets per VAE block (SD-1.5: 2)


SPECS = {
    # tests and nbval: every notebook in seconds
    "smoke": ScaleSpec((8, 16, 16, 16), 2, 4, 16, 8, 1, 8, (8, 16, 16, 16), 1),
    # the laptop study: ~8.6M U-Net params, 16x16 latents, 128x128 images
    "embedded": ScaleSpec((32, 64, 128, 128), 8, 8, 64, 8, 2, 16, (16, 32, 64, 64), 1),
}


@dataclass
class Teacher:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DDIMScheduler

    @property
    def latent_px(self) -> int:
        return self.unet.config.sample_size

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states for the U-Net's cross-attention, exactly as the SD pipeline makes them."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def pipeline(self, unet: torch.nn.Module | None = None):
        """A real diffusers StableDiffusionPipeline over these components (optionally another U-Net)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                       tokenizer=self.tokenizer, unet=unet or self.unet,
                                       scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, path: str | Path) -> None:
        """diffusers folder layout (model_index.json, unet/, vae/, ...), weights as safetensors."""
        self.pipeline().save_pretrained(path, safe_serialization=True)

    def num_params(self) -> dict[str, int]:
        return {name: count_params(getattr(self, name)) for name in ("unet", "vae", "text_encoder")}


def build_tokenizer(words: list[str], max_length: int):
    """A CLIP BPE tokenizer whose merges make each caption word a single token.

    SD's tokenizer cannot be downloaded here; this one has the same class, special tokens and
    byte-level alphabet, so any text still tokenizes (unknown words fall back to characters).
    BPE applies merges by rank, not word by word, so one word's early merge can split another word
    ('a n' inside 'hands'); each word whose pieces stay apart gets merges of its own pieces appended
    after all others, until every word is one token.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    words = sorted(set(words))
    vocab = sorted(ByteLevel.alphabet())
    vocab += [c + "</w>" for c in vocab]
    merges = []
    pieces = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    for _ in range(16):  # each pass completes the words the previous merges left in pieces
        for chain in pieces.values():
            while len(chain) > 1:  # merge left to right: 'c a', 'ca t</w>'
                merges.append((chain[0], chain[1]))
                chain[:2] = [chain[0] + chain[1]]
                vocab.append(chain[0])
        tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(
            vocab + ["<|startoftext|>", "<|endoftext|>"]))}, merges=list(dict.fromkeys(merges)),
            model_max_length=max_length)
        pieces = {w: got for w in words if len(got := tokenizer.tokenize(w)) > 1}
        if not pieces:
            return tokenizer
    raise RuntimeError(f"could not make single tokens of {sorted(pieces)}")


def build(spec: ScaleSpec, captions: list[str], seed: int) -> Teacher:
    """A freshly initialised teacher with SD-1.5's block topology at the widths of `spec`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer([w for c in captions for w in c.lower().split()], spec.text_len)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_dim, intermediate_size=4 * spec.text_dim,
        num_hidden_layers=spec.text_layers, num_attention_heads=max(1, spec.text_dim // 16),
        max_position_embeddings=spec.text_len, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # Frozen at CLIP's initialisation, word vectors (std 0.02) are no larger than position vectors, and
    # every caption comes out nearly the same (cosine 0.88 between captions at the embedded scale):
    # the U-Net then ignores its prompt. Unit-scale word vectors make captions that share few words
    # distinct (cosine 0.53), and the prompt steers the samples within a few hundred steps.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, WORD_VECTOR_STD)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_px, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=spec.unet_widths, down_block_types=SD15_DOWN_BLOCKS,
        up_block_types=SD15_UP_BLOCKS,
        cross_attention_dim=spec.text_dim, attention_head_dim=spec.heads,
        norm_num_groups=spec.norm_groups)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=8 * spec.latent_px,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_widths, layers_per_block=spec.vae_layers,
        norm_num_groups=spec.norm_groups)
    return Teacher(unet, vae, text_encoder.eval().requires_grad_(False), tokenizer,
                   DDIMScheduler(**EMBEDDED_SCHEDULE))


def load(path: str | Path) -> Teacher:
    """Load a diffusers folder (ours, or a local SD-1.5); errors say which part is missing."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tiny component is noise in a notebook
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"teacher folder {str(path)!r} does not exist")
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers Stable Diffusion folder: "
                                f"no {', '.join(p + '/' for p in missing)} (expected {parts})")
    return Teacher(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


def folder(root: str | Path, teacher: str) -> Path:
    """Where a stage finds the teacher: the study's own (`data/teacher`) or the local SD-1.5 folder."""
    return Path(root) / "data" / "teacher" if teacher == "embedded" else Path(teacher).expanduser()
