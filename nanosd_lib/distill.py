"""Module-level feature distillation: heal the pruned base, then train each student module alone.

1. **Heal** (BK-SDM style): the pruned base, initialised from the teacher, learns from the full teacher
   with three logged terms: the denoising task loss, output-level KD and feature-level KD at the
   outputs of the kept stages.
2. **Record** every stage's inputs and outputs inside the healed base, with one forward-hook recorder.
3. **Distil** each of the 30 student modules on exactly those inputs against its stage's output. Jobs
   are independent and individually seeded, so they can be split across `torchrun` ranks and resumed
   after a kill; every module is one safetensors file plus its metrics.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import student
from .outputs import LIBRARY, fingerprint, write_json
from .parallel import side_by_side
from .progress import bar
from .recorder import Recorder
from .space import STAGES, Arch, student_modules
from .training import LatentSet, adamw, optimizer_step


# Feature-KD pairs: (module in the base, module in the teacher, which output of each to compare).
# E3's output in the base is its last layer; in the teacher the same tensor is the skip before the
# downsampler the surgery removed.
FEATURE_PAIRS = {
    "E1": ("down_blocks.0", "down_blocks.0", lambda o: o[0], lambda o: o[0]),
    "E2": ("down_blocks.1", "down_blocks.1", lambda o: o[0], lambda o: o[0]),
    "E3": ("down_blocks.2", "down_blocks.2", lambda o: o[0], lambda o: o[1][-2]),
    "D3": ("up_blocks.0", "up_blocks.1", lambda o: o, lambda o: o),
    "D2": ("up_blocks.1", "up_blocks.2", lambda o: o, lambda o: o),
    "D1": ("up_blocks.2", "up_blocks.3", lambda o: o, lambda o: o),
}


@dataclass(frozen=True)
class HealWeights:
    task: float  # denoising loss against the schedule's target (noise or velocity)
    out: float  # output-level KD: match the teacher's prediction
    feat: float  # feature-level KD: match the teacher at each kept stage's output


def heal(base, teacher_unet, data: LatentSet, steps: int, batch_size: int, lr: float,
         weights: HealWeights, generator: torch.Generator, pairs: dict | None = None) -> list[dict]:
    """Train the pruned base against the (frozen) teacher; returns every term of every step.

    `pairs` (default FEATURE_PAIRS) names where features are matched, so other students (the
    baselines) can be trained the same way; a paired output must have the teacher's shape, and with
    no pairs feat_kd is logged as 0."""
    pairs = FEATURE_PAIRS if pairs is None else pairs
    return heal_together({"base": (base, pairs)}, teacher_unet, data, steps, batch_size, lr, weights,
                         generator)["base"]


def heal_together(students: dict, teacher_unet, data: LatentSet, steps: int, batch_size: int, lr: float,
                  weights: HealWeights, generator: torch.Generator, desc: str = "heal",
                  pool: int = 0, side_by_side: bool = False) -> dict[str, list[dict]]:
    """`heal` for several students in lockstep: {name: (model, pairs)} -> {name: log}.

    Each step draws one batch and runs the teacher once for all of them, so every student sees the same
    data and the teacher's forward (about 40 % of a step) is paid once. Each has its own optimizer.

    With `pool` > 0, `pool` batches are drawn first and the teacher runs once on each; every step then
    takes one of them at random (as module distillation reuses its recorded batches). The teacher's
    forward is then paid `pool` times instead of `steps` times.

    With a pool, `side_by_side` trains the students at once, one Python thread each, and splits torch's
    intra-op threads between them (at least one each), restoring the count afterwards. Small U-Nets use
    a second core poorly, so this finishes sooner than one student after the other on all threads. The
    pool indices are drawn up front, in the order the lockstep loop draws them, so every student still
    sees the same batches in the same order and nothing depends on how the threads interleave."""
    teacher_unet.eval().requires_grad_(False)
    t_names = sorted({p[1] for _, pairs in students.values() for p in pairs.values()})

    def draw():
        b = data.draw(batch_size, generator)
        with torch.no_grad(), Recorder(teacher_unet, t_names) as t_rec:
            t_pred = teacher_unet(b["noisy"], b["t"], encoder_hidden_states=b["text"]).sample
        return b, t_pred, {t: t_rec.calls[t][0][2] for t in t_names}

    if pool < 0:
        raise ValueError(f"heal_together: pool must be >= 0 batches, got {pool}")
    if side_by_side and not pool:
        raise ValueError("heal_together: side_by_side needs a pool (pool > 0): without one, every step's "
                         "batch and teacher forward are shared, so the students must move in lockstep")
    recorded = [draw() for _ in bar(range(pool), desc=f"{desc}: teacher on {pool} batches")] if pool else []
    opts = {}
    for name, (model, _) in students.items():
        model.train()
        opts[name] = adamw(model.parameters(), lr)
    logs = {name: [] for name in students}

    def update(name: str, step: int, b: dict, t_pred: torch.Tensor, t_out: dict) -> None:
        model, pairs = students[name]
        with Recorder(model, [p[0] for p in pairs.values()], detach=False) as s_rec:
            pred = model(b["noisy"], b["t"], encoder_hidden_states=b["text"]).sample
        terms = []
        for stage, (s, t, s_pick, t_pick) in pairs.items():
            s_feat, t_feat = s_pick(s_rec.calls[s][0][2]), t_pick(t_out[t])
            if s_feat.shape != t_feat.shape:
                raise ValueError(f"feature pair {stage}: student {s} gives {tuple(s_feat.shape)}, teacher "
                                 f"{t} gives {tuple(t_feat.shape)}; pairs must have equal shapes")
            terms.append(F.mse_loss(s_feat, t_feat))
        feat = sum(terms) / len(terms) if terms else pred.new_zeros(())
        task, out = F.mse_loss(pred, b["target"]), F.mse_loss(pred, t_pred)
        loss = weights.task * task + weights.out * out + weights.feat * feat
        optimizer_step(opts[name], loss, f"heal {name}" if len(students) > 1 else "heal", step, clip=model)
        logs[name].append({"step": step, "task": task.item(), "out_kd": out.item(), "feat_kd": feat.item(),
                           "total": loss.item()})

    if side_by_side:
        order = [int(torch.randint(pool, (), generator=generator)) for _ in range(steps)]
        _side_by_side(students, lambda name, step: update(name, step, *recorded[order[step]]), steps, desc)
    else:
        for step in bar(range(steps), desc=desc):
            b, t_pred, t_out = recorded[int(torch.randint(pool, (), generator=generator))] if pool else draw()
            for name in students:
                update(name, step, b, t_pred, t_out)
    for model, _ in students.values():
        model.eval()
    return logs


def _side_by_side(students: dict, update, steps: int, desc: str) -> None:
    """Run `update(name, step)` for every step, one thread per student (`parallel.side_by_side`)."""
    progress = bar(total=steps * len(students), desc=f"{desc}: {len(students)} side by side")

    def train(name: str):
        def job(stop) -> None:
            for step in range(steps):
                if stop.is_set():  # another student failed
                    return
                update(name, step)
                progress.update()
        return job

    try:
        side_by_side({name: train(name) for name in students})
    finally:
        progress.close()


@torch.no_grad()
def relative_error(model, reference, batch: dict) -> float:
    """||pred_model - pred_reference|| / ||pred_reference|| on one fixed batch (noise or v)."""
    ref = reference(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    pred = model(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    return ((pred - ref).norm() / ref.norm()).item()


@torch.no_grad()
def record_stages(base, batches: list[dict]) -> dict:
    """Each stage's positional inputs, keyword inputs and outputs inside the base architecture."""
    ref, _ = student.from_base(base, Arch.teacher())
    names = [f"stages.{s}" for s in STAGES]
    with Recorder(ref, names) as rec:
        for b in batches:
            ref(b["noisy"], b["t"], encoder_hidden_states=b["text"])
    records = {}
    for stage in STAGES:
        calls = rec.calls[f"stages.{stage}"]
        args = [_cat([c[0][i] for c in calls]) for i in range(len(calls[0][0]))]
        out = _cat([c[2] for c in calls])
        records[stage] = {"args": args, "kwargs": calls[0][1], "out": out}
    return records


def _cat(items):
    if torch.is_tensor(items[0]):
        return torch.cat(items)
    return [_cat([it[i] for it in items]) for i in range(len(items[0]))]  # lists of skips


def _take(x, idx):
    return x[idx.to(x.device)] if torch.is_tensor(x) else [_take(v, idx) for v in x]


def _flat(output) -> list[torch.Tensor]:
    """A stage's output as a list of tensors: (h, skips) for encoders, h for decoders."""
    if torch.is_tensor(output):
        return [output]
    h, skips = output
    return [h, *skips]


def module_name(stage: str, option: int) -> str:
    return f"{stage}-{option}"


@dataclass(frozen=True)
class ModuleJob:
    steps: int  # optimisation steps per module
    batch_size: int  # recorded samples per step
    lr: float  # AdamW learning rate (cosine-decayed to 0)
    seed: int  # base seed; each module adds its own index, so a job's result ignores who runs it
    checkpoint_every: int  # steps between resumable checkpoints


def distill_module(stage: str, option: int, base, records: dict, job: ModuleJob, out_dir: Path,
                   index: int) -> dict:
    """Train one student module on its stage's recorded inputs; resumable from `out_dir/partial`."""
    name = module_name(stage, option)
    final, meta_path = out_dir / f"{name}.safetensors", out_dir / f"{name}.json"
    partial = out_dir / "partial" / f"{name}.pt"
    if final.is_file() and meta_path.is_file():
        partial.unlink(missing_ok=True)  # a kill between the metadata and this cleanup leaves one behind
        return json.loads(meta_path.read_text())
    module = _init_module(base, stage, option)
    opt = adamw(module.parameters(), job.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=job.steps)
    gen = torch.Generator().manual_seed(job.seed * 1000 + index)
    start, log, seconds = 0, [], 0.0
    if partial.is_file():  # resume exactly where the last checkpoint left off
        state = torch.load(partial, weights_only=False)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start, log, seconds = state["step"], state["log"], state["seconds"]
    rec = records[stage]
    n = len(rec["out"] if torch.is_tensor(rec["out"]) else rec["out"][0])
    t0 = time.perf_counter()
    module.train()
    for step in range(start, job.steps):
        idx = torch.randint(n, (job.batch_size,), generator=gen)
        pred = _flat(module(*_take(rec["args"], idx), **rec["kwargs"]))
        target = _flat(_take(rec["out"], idx))
        loss = sum(F.mse_loss(p, t) for p, t in zip(pred, target)) / len(pred)
        optimizer_step(opt, loss, f"module {name}", step, sched=sched)
        log.append(loss.item())
        if (step + 1) % job.checkpoint_every == 0 and step + 1 < job.steps:
            partial.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"module": module.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "gen": gen.get_state(), "step": step + 1,
                        "log": log, "seconds": seconds + time.perf_counter() - t0},
                       partial.with_suffix(".tmp"))
            partial.with_suffix(".tmp").replace(partial)
    module.eval()
    with torch.no_grad():
        pred, target = _flat(module(*rec["args"], **rec["kwargs"])), _flat(rec["out"])
    rel = (sum((p - t).pow(2).sum() for p, t in zip(pred, target)).sqrt()
           / sum(t.pow(2).sum() for t in target).sqrt()).item()
    meta = {"module": name, "stage": stage, "option": option, "steps": job.steps,
            "final_loss": sum(log[-10:]) / len(log[-10:]), "relative_error": rel,
            "seconds": seconds + time.perf_counter() - t0, "losses": log}
    tmp = final.with_suffix(".tmp")  # weights, then metadata, each moved into place whole
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
    tmp.replace(final)
    write_json(meta_path, meta)
    partial.unlink(missing_ok=True)
    return meta


def _init_module(base, stage: str, option: int):
    """The student module as `from_base` would initialise it inside a candidate."""
    return student.stage_from_base(base, stage, option)


def distill_all(base, records: dict, job: ModuleJob, out_dir: Path, rank: int = 0,
                world: int = 1) -> list[dict]:
    """Every student module this rank owns (round-robin over ranks), skipping finished ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = list(enumerate(student_modules()))[rank::world]
    return [distill_module(stage, option, base, records, job, out_dir, index)
            for index, (stage, option) in bar(jobs, desc=f"modules (rank {rank}/{world})")]


def assemble(base, arch: Arch, students_dir: Path | None):
    """A candidate whose non-original stages are the distilled modules (or, with None, undistilled)."""
    cand, _ = student.from_base(base, arch)
    if students_dir is not None:
        for stage, option in arch.modules():
            path = Path(students_dir) / f"{module_name(stage, option)}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: module {stage} option {option} was not distilled")
            cand.stages[stage].load_state_dict(load_file(str(path)))
    return cand.eval()


def load_metas(out_dir: Path) -> list[dict]:
    """Every finished module's metrics, in job order; a missing one is an error naming it."""
    metas = []
    for stage, option in student_modules():
        path = Path(out_dir) / f"{module_name(stage, option)}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: module {stage} option {option} did not finish")
        metas.append(json.loads(path.read_text()))
    return metas


def prepare_dir(out_dir: Path, params: dict, *inputs: str | Path, library: Path = LIBRARY) -> str:
    """Keep `out_dir` only if it was made by this very run: same params, same library code, same
    inputs (the teacher's weights, the notebook); a resumed run. Otherwise empty it first."""
    import shutil

    print_ = fingerprint(params, *inputs, library=library)
    stamp = out_dir / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == print_:
        done = len(list(out_dir.glob("*-*.safetensors")))
        return f"resuming: {done} modules already finished, healed base kept (fingerprint {print_})"
    for child in out_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    stamp.write_text(print_)
    return f"starting clean (fingerprint {print_})"


def heal_or_load(base, teacher_unet, data: LatentSet, healed_dir: Path, steps: int, batch_size: int,
                 lr: float, weights: HealWeights, generator: torch.Generator):
    """The healed base: loaded from `healed_dir` when a resumed run already healed it, else healed
    and saved there. Returns (base, heal log)."""
    import pandas as pd
    from diffusers import UNet2DConditionModel

    if (healed_dir / "heal.json").is_file():
        log = pd.read_json(healed_dir / "heal.json").to_dict("records")
        return UNet2DConditionModel.from_pretrained(healed_dir).to(base.device).eval(), log
    log = heal(base, teacher_unet, data, steps, batch_size, lr, weights, generator)
    base.save_pretrained(healed_dir)
    write_json(healed_dir / "heal.json", log)
    return base, log


def distill_modules(base, records: dict, job: ModuleJob, out_dir: Path, ranks: int, threads: int,
                    healed_dir: Path) -> list[dict]:
    """All 30 modules: here with `ranks` 1, else a torchrun job whose ranks share them (it reads the
    healed base from `healed_dir` and the records from a scratch file)."""
    import subprocess
    import tempfile

    if ranks == 1:
        return distill_all(base, records, job, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(records, Path(tmp) / "records.pt")
        subprocess.run(torchrun_command(ranks, healed_dir, Path(tmp) / "records.pt", out_dir, job,
                                        max(1, threads // ranks)), check=True)
    return load_metas(out_dir)


def torchrun_command(ranks: int, base_dir: Path, records: str, out_dir: Path, job: ModuleJob,
                     threads: int) -> list[str]:
    """A single-node torchrun over `ranks` processes; multi-node adds the usual --nnodes/--rdzv flags."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", "-m", "nanosd_lib.distill", "--base", str(base_dir),
            "--records", str(records), "--out", str(out_dir), "--steps", str(job.steps),
            "--batch-size", str(job.batch_size), "--lr", str(job.lr), "--seed", str(job.seed),
            "--checkpoint-every", str(job.checkpoint_every), "--threads", str(threads)]


def main(argv: list[str] | None = None) -> None:
    """Worker entry point; under `torchrun` each rank takes every world-th module job.

        torchrun --nproc_per_node=2 -m nanosd_lib.distill --base B --records R --out O ...
    """
    import argparse
    import os

    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser(prog="python -m nanosd_lib.distill")
    p.add_argument("--base", required=True, help="healed base, a diffusers folder")
    p.add_argument("--records", required=True, help="torch file written by record_stages")
    p.add_argument("--out", required=True, help="folder for <stage>-<option>.safetensors")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--checkpoint-every", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    base = UNet2DConditionModel.from_pretrained(a.base).to(device).eval()
    records = torch.load(a.records, weights_only=False, map_location=device)
    job = ModuleJob(a.steps, a.batch_size, a.lr, a.seed, a.checkpoint_every)
    distill_all(base, records, job, Path(a.out), rank, world)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
