"""Distillation on a smoke-scale teacher: real models, real subprocesses, real torchrun."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nanosd_lib import data, distill, photos, space, surgery, training

JOB = distill.ModuleJob(steps=24, batch_size=8, lr=3e-3, seed=0, checkpoint_every=6)


@pytest.fixture(scope="module")
def latents(smoke_teacher):
    gen = torch.Generator().manual_seed(0)
    names = ["chelsea", "coffee", "rocket"]
    return training.latent_set(smoke_teacher, [data.to_tensor(photos.bundled(n)) for n in names],
                               [photos.CATALOGUE[n].caption for n in names], 32, gen, uncond_prob=0.1)


@pytest.fixture(scope="module")
def base(smoke_teacher):
    return surgery.prune(smoke_teacher.unet)[0]


@pytest.fixture(scope="module")
def records(base, latents):
    gen = torch.Generator().manual_seed(1)
    return distill.record_stages(base, [latents.draw(8, gen) for _ in range(3)])


@pytest.fixture(scope="module")
def worker_inputs(base, records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    base.save_pretrained(folder / "base")
    torch.save(records, folder / "records.pt")
    return folder


def worker(folder, out, ranks=1):
    args = ["--base", str(folder / "base"), "--records", str(folder / "records.pt"), "--out", str(out),
            "--steps", str(JOB.steps), "--batch-size", str(JOB.batch_size), "--lr", str(JOB.lr),
            "--seed", "0", "--checkpoint-every", str(JOB.checkpoint_every), "--threads", "1"]
    if ranks == 1:
        return [sys.executable, "-m", "nanosd_lib.distill", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", "-m", "nanosd_lib.distill", *args]


@pytest.fixture(scope="module")
def reference(base, records, worker_inputs):
    """One uninterrupted run of all 30 jobs, in this process on one thread as the workers run."""
    out = worker_inputs / "reference"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distill.distill_all(base, records, JOB, out)
    finally:
        torch.set_num_threads(before)
    return out


def same_results(a, b):
    for stage, option in space.student_modules():
        name = distill.module_name(stage, option)
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        ma, mb = json.loads((a / f"{name}.json").read_text()), json.loads((b / f"{name}.json").read_text())
        assert ma["losses"] == mb["losses"], name


def test_healing_pulls_the_base_to_the_teacher_and_logs_each_term(smoke_teacher, latents):
    teacher_unet = smoke_teacher.unet
    base = surgery.prune(teacher_unet)[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an untrained teacher barely needs its deep stages: damage the base instead
        for p in base.up_blocks.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    batch = latents.draw(16, torch.Generator().manual_seed(5))
    before = distill.relative_error(base, teacher_unet, batch)
    log = distill.heal(base, teacher_unet, latents, 30, 8, 1e-3,
                       distill.HealWeights(0.0, 1.0, 1.0), torch.Generator().manual_seed(0))
    assert set(log[0]) == {"step", "task", "out_kd", "feat_kd", "total"}
    assert distill.relative_error(base, teacher_unet, batch) < 0.8 * before


def test_recorded_inputs_reproduce_each_stage(base, records):
    for stage in space.STAGES:  # the base's own block (option 0) on its recorded inputs gives its recorded output
        ref = distill._init_module(base, stage, 0)
        with torch.no_grad():
            out = ref(*records[stage]["args"], **records[stage]["kwargs"])
        torch.testing.assert_close(out, records[stage]["out"], msg=lambda m, s=stage: f"{s}: {m}")
    assert len(records["E1"]["out"][1]) == 3 and len(records["E3"]["out"][1]) == 2  # skips


def test_every_module_is_written_and_learns(reference):
    metas = distill.load_metas(reference)
    assert len(metas) == 30
    for m in metas:
        assert m["steps"] == JOB.steps and m["losses"][-1] < m["losses"][0], m["module"]
    assert not list((reference / "partial").glob("*.pt"))


def test_distilled_candidates_beat_undistilled(base, latents, reference):
    batch = latents.draw(16, torch.Generator().manual_seed(9))
    ratios = []
    for arch in space.sample(16, seed=2):
        undistilled = distill.relative_error(distill.assemble(base, arch, None), base, batch)
        distilled = distill.relative_error(distill.assemble(base, arch, reference), base, batch)
        ratios.append(distilled / undistilled)
    assert sum(ratios) / len(ratios) < 0.8, ratios


def test_killed_torchrun_resumes_in_one_process_and_matches(worker_inputs, reference):
    """Two torchrun ranks killed mid-run, then a single process finishes the job: every module equals
    the uninterrupted single-process run's (ranks split the jobs, resuming ignores who wrote what)."""
    import psutil

    out = worker_inputs / "killed"
    proc = subprocess.Popen(worker(worker_inputs, out, ranks=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    launcher = psutil.Process(proc.pid)

    def every(sig):  # torchrun starts its ranks in sessions of their own: signal each process
        for p in [launcher, *launcher.children(recursive=True)]:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def done():  # a module is finished once its metadata, written after its weights, is there
        return {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p.with_suffix(".json").is_file()}

    def mid_run():  # >= 2 finished modules and a checkpoint of a next one
        return len(done()) >= 2 and list(out.glob("partial/*.pt"))

    deadline = time.time() + 300
    while time.time() < deadline:  # pause, look again, then kill: a module may finish in between
        if mid_run():
            every(signal.SIGSTOP)
            if mid_run():
                break
            every(signal.SIGCONT)
        time.sleep(0.01)
    every(signal.SIGKILL)
    proc.wait()
    finished = done()
    assert finished and len(finished) < 30 and list(out.glob("partial/*.pt"))
    before = torch.get_num_threads()
    try:  # the worker's own entry point, in this process: one rank of one (it sets one thread)
        distill.main(worker(worker_inputs, out)[3:])
    finally:
        torch.set_num_threads(before)
    assert all((out / n).stat().st_mtime_ns == t for n, t in finished.items())  # not redone
    same_results(out, reference)  # the ranks' modules, and the interrupted ones continued where they stopped
    assert not list(out.glob("partial/*.pt"))


def test_nan_loss_names_module_and_step_and_keeps_checkpoints(base, records, tmp_path):
    bad = {**records, "E2": {**records["E2"], "out": (records["E2"]["out"][0] * float("nan"),
                                                     records["E2"]["out"][1])}}
    with pytest.raises(FloatingPointError, match="module E2-1: loss became nan at step 0"):
        distill.distill_all(base, bad, JOB, tmp_path)
    kept = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert kept == ["E1-1", "E1-2", "E1-3"]


def test_assembling_a_missing_module_names_it(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="module D1 option 7 was not distilled"):
        distill.assemble(base, space.Arch.parse("e000-d007"), tmp_path)
