"""The baselines on a smoke-scale teacher: real tiny models, real photos, a few dozen KD steps."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from nanosd_lib import baselines, data, distill, space, student, surgery, training
from nanosd_lib.baseline import SD15_UNET, count_params


@pytest.fixture(scope="module")
def latents(smoke_teacher):
    """As test_distill's fixture, from photos bundled with scikit-image (no corpus needed)."""
    from skimage import data as bundled

    photos = [data.to_tensor(getattr(bundled, n)()) for n in ("chelsea", "coffee", "rocket")]
    crops, labels = data.random_crops(photos, 32, 64, torch.Generator().manual_seed(0), zoom=(1.0, 1.5))
    mean, std = training.encode_latents(smoke_teacher, crops)
    states = smoke_teacher.encode_prompts(["a tabby cat", "a cup of coffee", "a rocket", ""])
    sched = training.DDPMScheduler.from_config(smoke_teacher.scheduler.config)
    return training.LatentSet(mean, std, labels, states, 1.0, sched, uncond_prob=0.1)


@pytest.fixture(scope="module")
def batch(latents):
    return latents.draw(16, torch.Generator().manual_seed(5))


def smoke_target(arch_id: str, teacher_unet) -> int:
    """A smoke candidate's parameter count, as the family's tables give it."""
    base = surgery.prune(teacher_unet)[0]
    return student.arch_params(student.option_params(student.student_config(base)), space.Arch.parse(arch_id))


def meta_params(config: dict, widths) -> int:
    with torch.device("meta"):
        return count_params(UNet2DConditionModel(**{**config, "block_out_channels": widths}))


def test_bk_tiny_topology_and_size(smoke_teacher, batch):
    teacher_unet = smoke_teacher.unet
    bk, _ = baselines.bk_tiny(teacher_unet)
    assert [len(b.resnets) for b in bk.down_blocks] == [1, 1, 1]
    assert [len(b.resnets) for b in bk.up_blocks] == [2, 2, 2]
    assert [len(b.attentions) for b in bk.up_blocks] == [2, 2, 2] and bk.mid_block is None
    assert not bk.down_blocks[2].downsamplers  # E3's downsampler fed only D4
    base = surgery.prune(teacher_unet)[0]
    assert count_params(bk) < count_params(base) < count_params(teacher_unet)
    with torch.no_grad():
        out = bk(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
        ref = teacher_unet(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_bk_tiny_copies_every_tensor_and_logs_each_prefix(smoke_teacher):
    teacher_sd = smoke_teacher.unet.state_dict()
    bk, log = baselines.bk_tiny(smoke_teacher.unet)
    sd = bk.state_dict()
    pairs = dict(line.split(" <- teacher.") for line in log)
    # conv_in, time_embedding, conv_norm_out, conv_out; per down block R + A (+ 2 downsamplers);
    # per up block R, R, A, A (+ 2 upsamplers)
    assert len(log) == len(pairs) == 4 + 3 * 2 + 2 + 3 * 4 + 2
    assert "up_blocks.0.resnets.1. <- teacher.up_blocks.1.resnets.2." in log
    for key, value in sd.items():  # each tensor under exactly one logged prefix, equal to its source
        dst = [p for p in pairs if key.startswith(p)]
        assert len(dst) == 1, key
        assert torch.equal(value, teacher_sd[pairs[dst[0]] + key[len(dst[0]):]]), key
    assert {p for p in pairs if any(k.startswith(p) for k in sd)} == set(pairs)
    for mine, theirs in [("up_blocks.0.resnets.1.conv1.weight", "up_blocks.1.resnets.2.conv1.weight"),
                         ("up_blocks.2.attentions.1.proj_in.weight", "up_blocks.3.attentions.2.proj_in.weight"),
                         ("up_blocks.1.upsamplers.0.conv.weight", "up_blocks.2.upsamplers.0.conv.weight"),
                         ("down_blocks.2.resnets.0.conv2.weight", "down_blocks.2.resnets.0.conv2.weight"),
                         ("conv_out.weight", "conv_out.weight")]:
        assert torch.equal(sd[mine], teacher_sd[theirs]), mine
    assert baselines.bk_source("down_blocks.1.downsamplers.0.conv.bias") == (
        "down_blocks.1.downsamplers.0.", "down_blocks.1.downsamplers.0.")


def test_bk_tiny_names_a_tensor_whose_shapes_differ(smoke_teacher):
    # E4 wider than E3: D4 then hands D3 more channels than BK-tiny's D3 receives from E3
    cfg = {**dict(smoke_teacher.unet.config), "block_out_channels": (8, 16, 16, 32)}
    with torch.device("meta"):
        wide = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with pytest.raises(ValueError, match=r"student tensor 'up_blocks.0.resnets.0.norm1.weight' \(32,\) "
                                         r"cannot take teacher 'up_blocks.1.resnets.0.norm1.weight' \(48,\)"):
        baselines.bk_tiny(wide)


def test_bk_tiny_at_sd15_width_is_bk_sdm_tiny():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET)
        bk = UNet2DConditionModel(**baselines.bk_tiny_config(sd15.config))
    assert count_params(bk) == 323_384_964  # BK-SDM-Tiny's U-Net: 0.32B in its paper


def test_uniform_matches_a_candidate_with_the_full_topology(smoke_teacher, batch):
    cfg = dict(smoke_teacher.unet.config)
    target = smoke_target("e111-d222", smoke_teacher.unet)
    model, info = baselines.uniform(cfg, target, seed=0)
    assert info["params"] == count_params(model)
    assert abs(info["relative_gap"]) < 0.10  # measured: 113,020 for 104,212, +8.5 %
    # the best any uniform width can do: no scale lands closer (widths are coarse at smoke width)
    best = abs(info["params"] - target)
    for widths in {baselines.uniform_widths(cfg, s) for s in torch.linspace(0, 2, 129).tolist()}:
        assert abs(meta_params(cfg, widths) - target) >= best, widths
    groups, heads = cfg["norm_num_groups"], cfg["attention_head_dim"]
    widths = model.config.block_out_channels
    assert all(w % groups == 0 and w % heads == 0 for w in widths) and tuple(widths) == info["widths"]
    assert len(model.down_blocks) == 4 and model.mid_block is not None and len(model.up_blocks) == 4
    assert tuple(model.config.down_block_types) == tuple(cfg["down_block_types"])
    assert model.config.layers_per_block == 2
    assert model.config.cross_attention_dim == cfg["cross_attention_dim"]
    with torch.no_grad():
        out = model(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"]).sample
    assert out.shape == batch["noisy"].shape
    again, _ = baselines.uniform(cfg, target, seed=0)
    other, _ = baselines.uniform(cfg, target, seed=1)
    assert torch.equal(again.conv_in.weight, model.conv_in.weight)
    assert not torch.equal(other.conv_in.weight, model.conv_in.weight)


def test_uniform_at_sd15_width_and_its_limits(smoke_teacher):
    with torch.device("meta"):
        sd15 = dict(UNet2DConditionModel(**SD15_UNET).config)
    widths, _, params = baselines.match_widths(sd15, 202_283_204)  # e123-d456 at SD-1.5 width
    assert all(w % 32 == 0 for w in widths) and abs(params - 202_283_204) / 202_283_204 < 0.01
    cfg = dict(smoke_teacher.unet.config)
    smallest = meta_params(cfg, (4, 4, 4, 4))  # one unit, lcm(4 groups, 2 heads), per block
    with pytest.raises(ValueError, match=f"below the smallest buildable uniform U-Net \\({smallest:,}"):
        baselines.uniform(cfg, smallest - 1)


def test_kd_train_pulls_bk_tiny_to_the_teacher(smoke_teacher, latents, batch):
    bk, _ = baselines.bk_tiny(smoke_teacher.unet)
    assert baselines.kd_pairs(bk) == distill.FEATURE_PAIRS
    before = distill.relative_error(bk, smoke_teacher.unet, batch)
    log = baselines.kd_train(bk, smoke_teacher.unet, latents, 30, 8, 1e-3, baselines.BK_SDM_WEIGHTS,
                             torch.Generator().manual_seed(0))
    assert set(log[0]) == {"step", "task", "out_kd", "feat_kd", "total"} and len(log) == 30
    assert log[0]["feat_kd"] > 0 and log[-1]["feat_kd"] < log[0]["feat_kd"]
    assert distill.relative_error(bk, smoke_teacher.unet, batch) < 0.8 * before  # measured 1.03 -> 0.57


def test_kd_train_uniform_uses_task_and_output_only(smoke_teacher, latents):
    model, _ = baselines.uniform(dict(smoke_teacher.unet.config), 97_444)  # bk_tiny's smoke count
    assert baselines.kd_pairs(model) == {}
    log = baselines.kd_train(model, smoke_teacher.unet, latents, 30, 8, 1e-3, baselines.BK_SDM_WEIGHTS,
                             torch.Generator().manual_seed(0))
    assert all(r["feat_kd"] == 0.0 for r in log)  # logged as 0, not left out
    first, last = (sum(r["total"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert last < 0.9 * first  # measured 1.53 -> 1.27
    with pytest.raises(ValueError, match=r"feature pair E1: student down_blocks.0 gives \(4, 4, 4, 4\)"):
        distill.heal(model, smoke_teacher.unet, latents, 1, 4, 1e-3, baselines.BK_SDM_WEIGHTS,
                     torch.Generator().manual_seed(0), pairs=distill.FEATURE_PAIRS)


def test_kd_together_is_kd_one_at_a_time_on_the_same_batches(smoke_teacher, latents):
    """Lockstep training shares batches and the teacher's forward, and changes nothing else."""
    bk, _ = baselines.bk_tiny(smoke_teacher.unet)
    uniform, _ = baselines.uniform(dict(smoke_teacher.unet.config), 97_444)
    start = {"bk_tiny": copy.deepcopy(bk), "uniform": copy.deepcopy(uniform)}
    alone = {name: baselines.kd_train(copy.deepcopy(m), smoke_teacher.unet, latents, 4, 4, 1e-3,
                                      baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(3))
             for name, m in (("bk_tiny", bk), ("uniform", uniform))}
    together = baselines.kd_train_together({"bk_tiny": bk, "uniform": uniform}, smoke_teacher.unet, latents, 4, 4,
                                           1e-3, baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(3))
    for name in alone:
        for a, b in zip(alone[name], together[name], strict=True):
            assert a == pytest.approx(b, rel=1e-5), name
    for name, model in (("bk_tiny", bk), ("uniform", uniform)):  # both were trained, in place
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start[name].parameters())), name


def test_kd_from_a_pool_runs_the_teacher_once_per_pooled_batch_and_still_learns(smoke_teacher, latents, batch):
    bk, _ = baselines.bk_tiny(smoke_teacher.unet)
    before = distill.relative_error(bk, smoke_teacher.unet, batch)
    calls = []
    hook = smoke_teacher.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        logs = baselines.kd_train_together({"bk_tiny": bk}, smoke_teacher.unet, latents, 30, 8, 1e-3,
                                           baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(0), pool=6)
    finally:
        hook.remove()
    assert len(calls) == 6 and len(logs["bk_tiny"]) == 30  # 6 teacher forwards for 30 steps
    assert distill.relative_error(bk, smoke_teacher.unet, batch) < 0.8 * before  # on a batch outside the pool
    with pytest.raises(ValueError, match="pool must be >= 0"):
        baselines.kd_train_together({"bk_tiny": bk}, smoke_teacher.unet, latents, 1, 8, 1e-3,
                                    baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(0), pool=-1)


def test_side_by_side_kd_is_the_lockstep_loop_on_threads_sharing_the_cores(smoke_teacher, latents, batch):
    """Each student trains on its own thread with half the intra-op threads, on the pool batches the
    lockstep loop would take, in its order: same logs, same outputs. The thread count comes back."""
    import threading

    bk, _ = baselines.bk_tiny(smoke_teacher.unet)
    uniform, _ = baselines.uniform(dict(smoke_teacher.unet.config), 97_444)
    lockstep = {"bk_tiny": copy.deepcopy(bk), "uniform": copy.deepcopy(uniform)}
    seen = {}

    def where(name):  # a forward hook noting the thread a student runs on, and its intra-op threads
        return lambda *_: seen.setdefault(name, (threading.get_ident(), torch.get_num_threads())) and None

    hooks = [m.register_forward_hook(where(n)) for n, m in (("bk_tiny", bk), ("uniform", uniform))]
    threads = torch.get_num_threads()  # seed 4 takes pool batches 0, 1, 2, 0, 2, 0: the order shows
    try:
        side = baselines.kd_train_together({"bk_tiny": bk, "uniform": uniform}, smoke_teacher.unet, latents, 6, 4,
                                           1e-3, baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(4), pool=3,
                                           side_by_side=True)
    finally:
        for h in hooks:
            h.remove()
    assert torch.get_num_threads() == threads
    assert len({ident for ident, _ in seen.values()} | {threading.get_ident()}) == 3  # two workers, not this one
    assert {n for _, n in seen.values()} == {max(1, threads // 2)}
    torch.set_num_threads(max(1, threads // 2))  # as each worker had: Adam turns rounding into whole steps
    try:
        logs = baselines.kd_train_together(lockstep, smoke_teacher.unet, latents, 6, 4, 1e-3,
                                           baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(4), pool=3)
    finally:
        torch.set_num_threads(threads)
    for name, model in (("bk_tiny", bk), ("uniform", uniform)):
        for a, b in zip(logs[name], side[name], strict=True):
            assert a == pytest.approx(b, rel=1e-5), name
        # Outputs, not weights: a bias ahead of a GroupNorm has a zero gradient up to rounding, which Adam
        # turns into whole lr-sized steps either way; the norm removes them again.
        assert distill.relative_error(model, lockstep[name], batch) < 1e-4, name


def test_side_by_side_kd_raises_the_first_error_and_stops_the_other_student(smoke_teacher, latents):
    bk, _ = baselines.bk_tiny(smoke_teacher.unet)
    uniform, _ = baselines.uniform(dict(smoke_teacher.unet.config), 97_444)
    calls = []
    hook = bk.register_forward_hook(lambda *_: calls.append(1))
    students = {"bk_tiny": (bk, baselines.kd_pairs(bk)), "uniform": (uniform, distill.FEATURE_PAIRS)}  # no fit
    try:
        with pytest.raises(ValueError, match="feature pair E1: student down_blocks.0"):
            distill.heal_together(students, smoke_teacher.unet, latents, 200, 4, 1e-3, baselines.BK_SDM_WEIGHTS,
                                  torch.Generator().manual_seed(0), pool=2, side_by_side=True)
    finally:
        hook.remove()
    assert len(calls) < 200  # bk_tiny stopped at a step boundary instead of finishing its 200
    with pytest.raises(ValueError, match="side_by_side needs a pool"):
        baselines.kd_train_together({"bk_tiny": bk}, smoke_teacher.unet, latents, 1, 4, 1e-3,
                                    baselines.BK_SDM_WEIGHTS, torch.Generator().manual_seed(0), side_by_side=True)


def test_step_reduced():
    assert baselines.step_reduced(50, 100.0, 40.0) == 20
    assert baselines.step_reduced(25, 30.0, 10.0) == 8  # 8.33: the nearest whole step
    assert baselines.step_reduced(8, 19.6, 4.73) == 2  # 1.93: one step would cost half the target's time
    assert baselines.step_reduced(6, 40.0, 10.0) == 2  # 1.5: a half goes up
    assert baselines.step_reduced(4, 100.0, 10.0) == 1  # at least one step
    assert baselines.step_reduced(10, 50.0, 100.0) == 10  # a slower target: the teacher's own steps
    assert baselines.step_reduced(2, 0.7, 0.7 * 3 / 4) == 2  # 1.4999999999999998 in floating point
    with pytest.raises(ValueError, match="teacher_steps >= 1"):
        baselines.step_reduced(0, 1.0, 1.0)
    assert [b.name for b in baselines.BASELINES] == ["bk_tiny", "uniform", "step_reduced"]
