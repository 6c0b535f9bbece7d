"""The search space: per-stage options, and an architecture as a small value.

E1..E3 have 4 options each and D3..D1 have 8, option 0 being the teacher's own block:
4^3 * 8^3 = 32,768 architectures and 3*3 + 3*7 = 30 student modules to distil.

Layer strings: R full resnet, r half-width resnet, q quarter-width resnet (structured slimming of the
inner width); A full transformer, a lite transformer (cross-attention + 1x feed-forward, no
self-attention); a resnet with no letter after it has no attention.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

ENCODERS = ("E1", "E2", "E3")
DECODERS = ("D3", "D2", "D1")
STAGES = ENCODERS + DECODERS


@dataclass(frozen=True)
class Option:
    name: str  # layer string, read left to right
    resnet: float  # inner width of each resnet relative to the teacher's (1 = the teacher's block)
    attention: str | None  # "full", "lite" or None (removed)
    why: str  # the one-line rationale


ENCODER_OPTIONS = (
    Option("RARA", 1.0, "full", "the teacher's stage"),
    Option("RR", 1.0, None, "attention removed: self-attention is quadratic in tokens, memory-bound on NPUs"),
    Option("rara", 0.5, "lite", "half-width resnets + lite attention: keeps the prompt, halves conv MACs"),
    Option("qq", 0.25, None, "quarter-width resnets, no attention: the cheapest shape-compatible stage"),
)
DECODER_OPTIONS = (
    Option("RARARA", 1.0, "full", "the teacher's stage"),
    Option("RRR", 1.0, None, "attention removed, full convolutions"),
    Option("RaRaRa", 1.0, "lite", "full convolutions; cross-attention kept, self-attention and 3/4 of FF cut"),
    Option("rArArA", 0.5, "full", "half-width resnets, the teacher's attention"),
    Option("rarara", 0.5, "lite", "half-width resnets + lite attention"),
    Option("rrr", 0.5, None, "half-width resnets, no attention"),
    Option("qaqaqa", 0.25, "lite", "quarter-width resnets, lite attention: prompt-aware at low cost"),
    Option("qqq", 0.25, None, "quarter-width resnets, no attention: the cheapest decoder stage"),
)


def options(stage: str) -> tuple[Option, ...]:
    if stage in ENCODERS:
        return ENCODER_OPTIONS
    if stage in DECODERS:
        return DECODER_OPTIONS
    raise KeyError(f"unknown stage {stage!r}; the space has {list(STAGES)}")


def _allowed(stage: str) -> str:
    return ", ".join(f"{i}={o.name}" for i, o in enumerate(options(stage)))


_ID = re.compile(r"^e([0-9]{3})-d([0-9]{3})$")


@dataclass(frozen=True, order=True)
class Arch:
    """Option index per stage, in the order E1 E2 E3 D3 D2 D1. Its id reads `e012-d345`."""

    choices: tuple[int, ...]

    def __post_init__(self):
        if len(self.choices) != len(STAGES):
            raise ValueError(f"an architecture has {len(STAGES)} choices ({', '.join(STAGES)}), "
                             f"got {len(self.choices)}")
        for stage, index in zip(STAGES, self.choices):
            if not isinstance(index, int) or not 0 <= index < len(options(stage)):
                raise ValueError(f"stage {stage}: option {index!r} does not exist; "
                                 f"allowed: {_allowed(stage)}")

    @classmethod
    def teacher(cls) -> "Arch":
        return cls((0,) * len(STAGES))

    @classmethod
    def parse(cls, arch_id: str) -> "Arch":
        match = _ID.match(arch_id)
        if not match:
            raise ValueError(f"architecture id {arch_id!r} is not of the form 'eXXX-dXXX' "
                             f"(E1 E2 E3 options 0-3, D3 D2 D1 options 0-7), e.g. 'e013-d257'")
        return cls(tuple(int(c) for c in match.group(1) + match.group(2)))

    @property
    def id(self) -> str:
        c = self.choices
        return f"e{c[0]}{c[1]}{c[2]}-d{c[3]}{c[4]}{c[5]}"

    def option(self, stage: str) -> Option:
        return options(stage)[self.choices[STAGES.index(stage)]]

    def describe(self) -> str:
        return " ".join(f"{s}:{self.option(s).name}" for s in STAGES)

    def vector(self) -> list[float]:
        """Each choice scaled to [0, 1] by its stage's option count, for the search's model."""
        return [c / (len(options(s)) - 1) for s, c in zip(STAGES, self.choices)]

    def modules(self) -> list[tuple[str, int]]:
        """The (stage, option) student modules this architecture uses (option 0 is the base's)."""
        return [(s, c) for s, c in zip(STAGES, self.choices) if c != 0]


def option_names() -> list[str]:
    """'E1/0' ... 'D1/7': one name per (stage, option), the keys of every latency table."""
    return [f"{s}/{i}" for s in STAGES for i in range(len(options(s)))]


def space_size() -> int:
    size = 1
    for stage in STAGES:
        size *= len(options(stage))
    return size


def enumerate_space():
    """Every architecture, in id order."""
    for choices in itertools.product(*(range(len(options(s))) for s in STAGES)):
        yield Arch(choices)


def student_modules() -> list[tuple[str, int]]:
    """The 30 modules to distil: every non-original option of every stage."""
    return [(s, i) for s in STAGES for i in range(1, len(options(s)))]


def sample(n: int, seed: int) -> list[Arch]:
    """`n` distinct architectures drawn uniformly (seeded)."""
    rng = random.Random(seed)
    picks = rng.sample(range(space_size()), n)
    sizes = [len(options(s)) for s in STAGES]
    out = []
    for flat in picks:
        choices = []
        for size in reversed(sizes):
            flat, c = divmod(flat, size)
            choices.append(c)
        out.append(Arch(tuple(reversed(choices))))
    return out
