"""The baselines the NanoSD family is compared with, each trained on the same data and budget.

The paper names two kinds of existing approach: bluntly compress the U-Net, or reduce the diffusion
steps. Stage 07 stands one of each beside the family, plus a same-size control:

- **bk_tiny**: BK-SDM-Tiny's architecture (E4, Mid and D4 removed as `surgery.prune` does, and one
  resnet-attention pair fewer in every kept stage), initialised from the teacher through an explicit,
  logged student <- teacher map, and trained by whole-model KD as BK-SDM is.
- **uniform**: the teacher's full topology with every width scaled by one factor, so that its
  parameter count matches a target (a family member's); trained by KD from a random start.
- **step_reduced**: the teacher itself, sampled with the whole number of steps whose time per image is
  nearest a family member's.

Whole-model KD is `distill.heal`: task loss + output KD + feature KD at the stage outputs, every term
logged; `kd_pairs` says which feature pairs a model can be matched at.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from . import distill, surgery
from .baseline import count_params, model_config
from .training import LatentSet


@dataclass(frozen=True)
class Baseline:
    name: str  # the key used in tables and file names
    what: str  # how it is built
    why: str  # the claim it tests


BASELINES = (
    Baseline("bk_tiny", "E4, Mid, D4 removed and one R-A pair fewer per stage (R-A down, R-A-R-A up), "
             "teacher-initialised, whole-model KD (task + output + stage features)",
             "the blunt U-Net compression the paper says it beats (BK-SDM-Tiny)"),
    Baseline("uniform", "the teacher's full topology, every width scaled by one factor to a member's "
             "parameter count, random init, KD on task + output (no feature pairs fit)",
             "is the searched architecture better than the same parameters spread evenly?"),
    Baseline("step_reduced", "the teacher sampled with fewer steps, to a member's time per image",
             "the other existing approach: keep the model, cut the diffusion steps"),
)
BK_SDM_WEIGHTS = distill.HealWeights(task=1.0, out=1.0, feat=1.0)  # BK-SDM's lambda_sd/out/feat


# ---------------------------------------------------------------- BK-SDM-Tiny

def bk_tiny_config(teacher_config) -> dict:
    """The pruned base's config with one layer per down block (up blocks get one more: 2)."""
    return {**surgery.base_config(teacher_config), "layers_per_block": 1}


_LAYER = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_TEACHER_PREFIX = {dst: src for src, dst in surgery.PREFIX_MAP.items()}  # pruned name -> teacher's


def bk_source(key: str) -> tuple[str, str]:
    """(student prefix, teacher prefix) for one student tensor name.

    Down blocks keep the teacher's first (resnet, attention) pair. Up blocks keep layers 0 and 2 of
    the teacher's 3 (BK-SDM's `connect_info`): layer 2 consumes the stage's first skip, the very
    tensor the student's layer 1 now consumes, so its input channels fit. Samplers and the fixed parts
    (conv_in, time_embedding, norms, conv_out) come by name through the surgery's prefix map."""
    m = _LAYER.match(key)
    if m is None:
        top = key.split(".")[0] + "."
        return top, top
    side, block, kind, layer = m.groups()
    if side == "up" and kind in ("resnets", "attentions"):
        return m.group(0), f"up_blocks.{int(block) + 1}.{kind}.{2 * int(layer)}."
    block_prefix = f"{side}_blocks.{block}."
    return m.group(0), _TEACHER_PREFIX[block_prefix] + m.group(0)[len(block_prefix):]


@torch.no_grad()
def bk_tiny(teacher_unet: UNet2DConditionModel) -> tuple[UNet2DConditionModel, list[str]]:
    """BK-SDM-Tiny's U-Net initialised from the teacher; the log has one line per copied prefix."""
    student = UNet2DConditionModel(**bk_tiny_config(teacher_unet.config))
    teacher_sd = teacher_unet.state_dict()
    mapped, used, log = {}, {}, {}
    for key, value in student.state_dict().items():
        dst, src = bk_source(key)
        source = src + key[len(dst):]
        if source not in teacher_sd:
            raise KeyError(f"bk_tiny: student tensor {key!r} maps to teacher {source!r}, which the "
                           f"teacher does not have")
        if teacher_sd[source].shape != value.shape:
            raise ValueError(f"bk_tiny: student tensor {key!r} {tuple(value.shape)} cannot take teacher "
                             f"{source!r} {tuple(teacher_sd[source].shape)}; shapes must be equal")
        if source in used:
            raise ValueError(f"bk_tiny: teacher {source!r} would feed both {used[source]!r} and {key!r}")
        mapped[key], used[source] = teacher_sd[source], key
        log[dst] = f"{dst} <- teacher.{src}"
    student.load_state_dict(mapped, strict=True)  # and every student tensor got one
    if student.dtype != teacher_unet.dtype:
        student = student.to(teacher_unet.dtype)
    return student.to(teacher_unet.device).eval(), list(log.values())


# ------------------------------------------------------- parameter-matched uniform

def _config(teacher_config) -> dict:
    surgery.check_teacher(teacher_config)
    return model_config(teacher_config)


def width_units(teacher_config) -> tuple[int, ...]:
    """Per block, what every width must be a multiple of: the GroupNorm groups and the heads.

    In SD-1.5's configs `attention_head_dim` is the number of heads (diffusers' historical naming);
    `num_attention_heads`, when set, takes precedence, as it does inside diffusers."""
    cfg = _config(teacher_config)
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    n = len(cfg["block_out_channels"])
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    return tuple(math.lcm(cfg["norm_num_groups"], h) for h in heads)


def uniform_widths(teacher_config, scale: float) -> tuple[int, ...]:
    """The teacher's widths times `scale`, each rounded to its unit (one unit at least)."""
    widths = _config(teacher_config)["block_out_channels"]
    units = width_units(teacher_config)  # halves round up, not to even: monotone and predictable
    return tuple(u * max(1, math.floor(scale * w / u + 0.5)) for w, u in zip(widths, units))


def _params(cfg: dict, widths: tuple[int, ...], cache: dict) -> int:
    if widths not in cache:  # built on the meta device: exact counts, no memory, ~0.1 s at SD-1.5
        with torch.device("meta"):
            cache[widths] = count_params(UNet2DConditionModel(**{**cfg, "block_out_channels": widths}))
    return cache[widths]


def match_widths(teacher_config, target_params: int, max_scale: float = 16.0) -> tuple[tuple, float, int]:
    """(widths, scale, params) of the uniform U-Net closest to `target_params`, counted on meta.

    Widths only grow with the scale, so the count is a non-decreasing step function of it: bisection
    finds the step that crosses the target, and the closer of its two sides wins."""
    cfg, cache = _config(teacher_config), {}
    smallest = _params(cfg, uniform_widths(cfg, 0.0), cache)
    if target_params < smallest:
        raise ValueError(f"uniform: target {target_params:,} params is below the smallest buildable "
                         f"uniform U-Net ({smallest:,} params at widths {uniform_widths(cfg, 0.0)}, one "
                         f"unit {width_units(cfg)} per block); allowed: >= {smallest:,}")
    lo, hi = 0.0, 1.0
    while _params(cfg, uniform_widths(cfg, hi), cache) < target_params:
        hi *= 2
        if hi > max_scale:
            raise ValueError(f"uniform: target {target_params:,} params needs more than {max_scale}x "
                             f"the teacher's widths; raise max_scale or lower the target")
    for _ in range(40):  # far past the last width step; cached, so few real builds
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _params(cfg, uniform_widths(cfg, mid), cache) < target_params else (lo, mid)
    scale = min((lo, hi), key=lambda s: abs(_params(cfg, uniform_widths(cfg, s), cache) - target_params))
    return uniform_widths(cfg, scale), scale, _params(cfg, uniform_widths(cfg, scale), cache)


def uniform(teacher_config, target_params: int, seed: int = 0) -> tuple[UNet2DConditionModel, dict]:
    """The teacher's full topology (E4, Mid, D4 kept) at the uniform width closest to `target_params`;
    `info` holds the widths, the achieved count and its relative gap to the target.

    Random (seeded) initialisation, not slices of the teacher: a narrower width changes every tensor's
    shape, so nothing copies whole, and any slicing rule (first channels, largest norms) regroups the
    GroupNorm groups and the attention heads; that rule would be a pruning method of its own and the
    baseline would measure it instead of the architecture. The notebook must say that this baseline
    starts from scratch while bk_tiny and the family start from the teacher's weights."""
    cfg = _config(teacher_config)
    widths, scale, _ = match_widths(cfg, target_params)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**{**cfg, "block_out_channels": widths})
    params = count_params(model)
    info = {"widths": widths, "teacher_widths": tuple(cfg["block_out_channels"]), "scale": scale,
            "params": params, "target_params": int(target_params),
            "relative_gap": (params - target_params) / target_params, "init": f"random, seed {seed}"}
    return model.eval(), info


# ---------------------------------------------------------------- training

def kd_pairs(model) -> dict:
    """The feature-KD pairs `model` can be matched at against the full teacher.

    A model with the pruned topology (three down blocks, no mid block: the base or bk_tiny) has the
    teacher's stage outputs at the base's module names, E3's being the teacher's skip before the
    removed downsampler: `distill.FEATURE_PAIRS`. A full-topology baseline here is width-rescaled, so
    none of its stage outputs has the teacher's shape: no pairs, KD on task + output only."""
    cfg = model.config
    downs, mid = getattr(cfg, "down_block_types", None), getattr(cfg, "mid_block_type", None)
    if downs is not None and len(downs) == 3 and mid is None:
        return dict(distill.FEATURE_PAIRS)
    if downs is not None and len(downs) == 4 and mid is not None:
        return {}
    raise ValueError(f"kd_pairs: {type(model).__name__} with down blocks {downs} and mid block {mid!r} "
                     "is neither the pruned topology (3 down blocks, no mid) nor the full one (4, mid)")


def kd_train(student, teacher_unet, data: LatentSet, steps: int, batch_size: int, lr: float,
             weights: distill.HealWeights, generator: torch.Generator) -> list[dict]:
    """Whole-model KD against the frozen teacher, with the feature pairs this student can use.

    Every row logs task, out_kd, feat_kd and total; feat_kd is 0.0 for a model with no pairs."""
    return distill.heal(student, teacher_unet, data, steps, batch_size, lr, weights, generator,
                        pairs=kd_pairs(student))


def kd_train_together(students: dict, teacher_unet, data: LatentSet, steps: int, batch_size: int, lr: float,
                      weights: distill.HealWeights, generator: torch.Generator,
                      pool: int = 0, side_by_side: bool = False) -> dict[str, list[dict]]:
    """`kd_train` for {name: student} on the same batches: one teacher forward a step, or, with `pool` > 0,
    one per batch of a pool drawn up front; with a pool, `side_by_side` trains them at once, a thread
    each (`distill.heal_together`)."""
    return distill.heal_together({n: (m, kd_pairs(m)) for n, m in students.items()}, teacher_unet, data,
                                 steps, batch_size, lr, weights, generator, desc="baseline KD", pool=pool,
                                 side_by_side=side_by_side)


# ---------------------------------------------------------------- fewer steps

def step_reduced(teacher_steps: int, teacher_ms: float, target_ms: float) -> int:
    """Steps at which the teacher's time per image is nearest the target's at `teacher_steps` steps.

    `teacher_ms` and `target_ms` are each model's time per U-Net evaluation, and both sample with the
    same scheduler; the image costs steps x evaluation time. Classifier-free guidance doubles both
    sides (two evaluations or a doubled batch per step), so pass the times for the same guidance
    setting and the factor cancels. Steps are whole, so the match is rounded to the nearest step (an
    exact half goes up): rounding down always would give the baseline up to a whole step's time less
    than the target, rounding up up to a step more. Never fewer than 1 step, never more than
    `teacher_steps`."""
    if teacher_steps < 1 or teacher_ms <= 0 or target_ms <= 0:
        raise ValueError(f"step_reduced: need teacher_steps >= 1 and positive times, got "
                         f"teacher_steps={teacher_steps}, teacher_ms={teacher_ms}, target_ms={target_ms}")
    budget = teacher_steps * target_ms  # the target's time per image
    return max(1, min(teacher_steps, math.floor(budget / teacher_ms + 0.5 + 1e-9)))  # 1e-9: float ties
