import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from nanosd_lib import config, data, quality, training, vae


@pytest.fixture(scope="module")
def crops():
    """32-px crops of two real photos (skimage's astronaut and coffee), in [-1, 1]."""
    from skimage import data as skdata

    photos = [data.to_tensor(skdata.astronaut()), data.to_tensor(skdata.coffee())]
    return data.random_crops(photos, 64, 32, torch.Generator().manual_seed(0), zoom=(1.0, 4.0))[0]


@pytest.fixture(scope="module")
def young_teacher(smoke_teacher, crops):
    """A copy of the smoke teacher whose VAE trained 60 steps: its posterior is near-deterministic, as a
    trained VAE's is (an untrained one's unit variance would bury every latent in noise)."""
    t = dataclasses.replace(smoke_teacher, vae=copy.deepcopy(smoke_teacher.vae))
    training.train_vae(t, crops, 60, 8, 2e-3, 1e-6, torch.Generator().manual_seed(0))
    return t.vae


@pytest.fixture(scope="module")
def net(study_root):
    return quality.feature_net(study_root)


def two_layer_teacher():
    """SD-1.5's depth (2 resnets per encoder block, 3 per decoder block) at smoke width."""
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=2, norm_num_groups=4, scaling_factor=0.5)


@pytest.mark.parametrize("name", [o.name for o in vae.OPTIONS])
def test_every_option_is_a_smaller_drop_in_autoencoder(smoke_teacher, name, tmp_path):
    teacher = smoke_teacher.vae
    slim, log = vae.build(teacher, name)
    assert type(slim) is AutoencoderKL
    assert slim.config.latent_channels == teacher.config.latent_channels == 4
    assert slim.config.scaling_factor == teacher.config.scaling_factor
    assert list(slim.config.up_block_types) == list(teacher.config.up_block_types)  # 3 upsamplers: factor 8
    assert vae.params(slim)["total"] < vae.params(teacher)["total"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        shapes = [v.encode(x).latent_dist.mean.shape for v in (slim, teacher)]
    assert shapes == [(2, 4, 8, 8)] * 2
    slim.save_pretrained(tmp_path)
    again = AutoencoderKL.from_pretrained(tmp_path)
    assert tuple(again.config.block_out_channels) == tuple(slim.config.block_out_channels)
    for (k, a), (_, b) in zip(slim.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_teacher_tensors_are_copied_and_logged(smoke_teacher):
    teacher = smoke_teacher.vae
    slim, log = vae.build(teacher, "w1/2")
    assert torch.equal(slim.post_quant_conv.weight, teacher.post_quant_conv.weight)
    assert torch.equal(slim.quant_conv.weight, teacher.quant_conv.weight)
    assert "post_quant_conv <- teacher[post_quant_conv] exact" in log
    # narrowed: the leading channels of both dimensions
    assert torch.equal(slim.decoder.up_blocks[0].resnets[0].conv1.weight,
                       teacher.decoder.up_blocks[0].resnets[0].conv1.weight[:8, :8])
    assert ("decoder.up_blocks.0.resnets.0.conv1 <- teacher[decoder.up_blocks.0.resnets.0.conv1] "
            "8/16 out x 8/16 in channels") in log
    assert "encoder.conv_out <- teacher[encoder.conv_out] 8/8 out x 8/16 in channels" in log
    assert len(log) == len({n.rpartition(".")[0] for n, _ in slim.named_parameters()})


def test_one_resnet_per_block_keeps_the_outer_ones():
    teacher = two_layer_teacher()
    slim, log = vae.build(teacher, "w1/2-l1")
    assert slim.config.layers_per_block == 1 and len(slim.decoder.up_blocks[0].resnets) == 2
    assert "decoder.up_blocks.0.resnets.1.conv1 <- teacher[decoder.up_blocks.0.resnets.2.conv1] " \
           "8/16 out x 8/16 in channels" in log
    assert torch.equal(slim.decoder.up_blocks[0].resnets[1].conv2.bias,
                       teacher.decoder.up_blocks[0].resnets[2].conv2.bias[:8])
    assert "encoder.down_blocks.1.resnets.0.conv1 <- teacher[encoder.down_blocks.1.resnets.0.conv1] " \
           "8/16 out x 4/8 in channels" in log  # resnet 0 changes the width: always the teacher's first
    assert slim.config.scaling_factor == 0.5


def test_options_without_mid_attention_drop_it(smoke_teacher):
    slim, log = vae.build(smoke_teacher.vae, "w1/2-l1-na")
    assert not slim.config.mid_block_add_attention
    assert slim.decoder.mid_block.attentions[0] is None
    assert not any("attentions" in line for line in log)


def test_impossible_widths_and_groups_name_the_option():
    cfg = dict(two_layer_teacher().config)
    with pytest.raises(ValueError, match=r"'w1/4-l1'.*GroupNorm groups 2 x 1/4 = 0.5"):
        vae.slim_config(cfg | {"norm_num_groups": 2}, "w1/4-l1")
    with pytest.raises(ValueError, match=r"'w1/4-l1-na'.*width 6 x 1/4 = 1.5"):
        vae.slim_config(cfg | {"block_out_channels": (6, 12, 12, 12), "norm_num_groups": 3}, "w1/4-l1-na")
    with pytest.raises(KeyError, match=r"'w1/3'.*allowed: \['w1/2'"):
        vae.slim_config(cfg, "w1/3")


def test_distillation_lowers_reconstruction_and_decoder_match(young_teacher, crops, net):
    teacher = young_teacher
    slim, _ = vae.build(teacher, "w1/2")
    held_out = crops[-8:]
    with torch.no_grad():
        latents = teacher.encode(held_out).latent_dist.mean * teacher.config.scaling_factor
    before = vae.round_trip(slim, held_out)["psnr"], vae.latent_compat(teacher, slim, latents)["psnr"]
    log = vae.distill(teacher, slim, crops[:-8], steps=30, batch_size=8, lr=3e-3, weights=vae.LossWeights(),
                      generator=torch.Generator().manual_seed(0), net=net)
    assert len(log) == 30 and not slim.training
    assert all(set(vae.TERMS) <= set(row) and all(math.isfinite(row[k]) for k in vae.TERMS) for row in log)
    first, last = ({k: np.mean([r[k] for r in rows]) for k in vae.TERMS} for rows in (log[:5], log[-5:]))
    assert last["recon"] < 0.9 * first["recon"] and last["decoder"] < 0.5 * first["decoder"], (first, last)
    assert last["latent"] < 0.5 * first["latent"], (first, last)
    after = vae.round_trip(slim, held_out)["psnr"], vae.latent_compat(teacher, slim, latents)["psnr"]
    assert after[0] > before[0] + 0.25 and after[1] > before[1] + 3, (before, after)


def test_generated_latents_teach_the_decoder_where_photo_encodings_do_not_reach(young_teacher, crops):
    """A U-Net's samples need not look like a photo's encodings. Stand-ins far from them (smooth noise
    at twice the encodings' spread): matching the decoders on windows of such latents as well must
    bring the slim decoder closer to the teacher's on unseen ones than the encodings alone do."""
    teacher = young_teacher
    with torch.no_grad():
        spread = (teacher.encode(crops).latent_dist.mean * teacher.config.scaling_factor).std()
    g = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(48, 4, 12, 12, generator=g), 3, 1, 1)
    far = smooth * 3 * 2 * spread  # a 3x3 mean of unit noise has spread 1/3
    train, unseen = far[:32], far[32:, :, :8, :8]
    windows = vae._latent_crops(train, 5, (4, 4), torch.Generator().manual_seed(0))
    assert windows.shape == (5, 4, 4, 4)
    assert any(torch.equal(windows[0], r[:, i:i + 4, j:j + 4])
               for r in train for i in range(9) for j in range(9))
    weights = vae.LossWeights(latent=1.0, kl=0.0, recon=1.0, perceptual=0.0, decoder=1.0)
    compat = {}
    for name, extra in {"encodings": None, "with generated": train}.items():
        slim, _ = vae.build(teacher, "w1/2")
        log = vae.distill(teacher, slim, crops, steps=30, batch_size=8, lr=3e-3, weights=weights,
                          generator=torch.Generator().manual_seed(0), train_latents=extra)
        assert all(math.isfinite(r["decoder"]) for r in log)
        compat[name] = vae.latent_compat(teacher, slim, unseen)["psnr"]
    assert compat["with generated"] > compat["encodings"] + 1.0, compat


def test_a_zero_weight_is_logged_but_not_optimised(smoke_teacher, crops, net):
    """Latent match alone trains the encoder only: had the zero-weight reconstruction, perceptual or
    decoder terms joined the loss, the decoder would have moved."""
    slim, _ = vae.build(smoke_teacher.vae, "w1/2")
    decoder = {k: v.clone() for k, v in slim.decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in slim.encoder.state_dict().items()}
    weights = vae.LossWeights(latent=1.0, kl=0.0, recon=0.0, perceptual=0.0, decoder=0.0)
    log = vae.distill(smoke_teacher.vae, slim, crops, steps=3, batch_size=4, lr=1e-3, weights=weights,
                      generator=torch.Generator().manual_seed(0), net=net)
    assert all(math.isfinite(row[k]) and row[k] > 0 for row in log for k in vae.TERMS)
    assert all(torch.equal(v, slim.decoder.state_dict()[k]) for k, v in decoder.items())
    assert not all(torch.equal(v, slim.encoder.state_dict()[k]) for k, v in encoder.items())
    with pytest.raises(ValueError, match="perceptual = 0.1 needs the feature net"):
        vae.distill(smoke_teacher.vae, slim, crops, 1, 4, 1e-3, vae.LossWeights(), torch.Generator(), None)


def test_the_tune_leg_trains_the_slim_vae_on_its_own_crops(young_teacher, crops):
    """The second leg draws from its own (larger) crops, continues the step count, and, with a fresh
    one-cycle rate, lowers the reconstruction error on crops of its size."""
    from skimage import data as skdata

    large = data.random_crops([data.to_tensor(skdata.astronaut())], 12, 64, torch.Generator().manual_seed(1))[0]
    weights = vae.LossWeights(perceptual=0.0)
    slim, _ = vae.build(young_teacher, "w1/2")
    vae.distill(young_teacher, slim, crops, 30, 8, 3e-3, weights, torch.Generator().manual_seed(0))
    before = vae.round_trip(slim, large)["psnr"]
    log = vae.distill(young_teacher, slim, crops, 5, 8, 1e-3, weights, torch.Generator().manual_seed(0),
                      tune=training.VaePhase(large, 25, 2, 2e-3))
    assert [r["phase"] for r in log] == [0] * 5 + [1] * 25
    assert [r["step"] for r in log] == list(range(30))
    assert vae.round_trip(slim, large)["psnr"] > before


def test_tune_phase_keeps_the_pixels_of_the_first_leg():
    photos = [torch.zeros(1, 3, 96, 128)]
    group = config.check(slim_vae={"tune": {"steps": 10, "crop_px": 64, "batch_size": 2, "lr": 1e-3}}).slim_vae.tune
    leg = training.tune_phase(photos, 64, 32, group, torch.Generator().manual_seed(0))
    assert leg.crops.shape == (16, 3, 64, 64) and (leg.steps, leg.batch_size, leg.lr) == (10, 2, 1e-3)


def test_the_slim_vae_runs_in_a_stable_diffusion_pipeline(smoke_teacher):
    slim, _ = vae.build(smoke_teacher.vae, "w1/4-l1-na")
    images = []
    for decoder in (smoke_teacher.vae, slim):
        pipe = smoke_teacher.pipeline()
        pipe.vae = decoder
        images.append(pipe("a photo", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images)
    assert images[1].shape == (1, 3, 64, 64) and torch.isfinite(images[1]).all()
    assert not torch.allclose(images[0], images[1], atol=1e-3)  # the slim decoder did the decoding


def test_latent_compat_is_perfect_only_against_itself(smoke_teacher):
    teacher = smoke_teacher.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    itself = vae.latent_compat(teacher, teacher, latents)["psnr"]
    slim = vae.latent_compat(teacher, vae.build(teacher, "w1/4-l1")[0], latents)["psnr"]
    assert math.isfinite(slim) and (itself == math.inf or itself > 80) and itself > slim


def test_sd15_width_counts_on_meta():
    ratios = {}
    for o in vae.OPTIONS:
        sd, slim = vae.sd15_pair(o.name)
        assert all(p.is_meta for p in slim.parameters())
        full, small = vae.params(sd), vae.params(slim)
        assert full == {"encoder": 34_163_664, "decoder": 49_490_199, "total": vae.SD15_VAE_PARAMS}
        assert small["encoder"] < full["encoder"] and small["decoder"] < full["decoder"]
        ratios[o.name] = full["total"] / small["total"]
    assert ratios == pytest.approx({"w1/2": 3.994, "w1/2-l1": 5.404, "w1/2-l1-na": 5.594,
                                    "w1/4-l1": 21.54, "w1/4-l1-na": 22.30}, rel=1e-3)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_decode_latency_on_both_backends(smoke_teacher, backend, tmp_path):
    slim, _ = vae.build(smoke_teacher.vae, "w1/2")  # keeps the mid-block attention: it must export too
    ms = vae.decode_latency(slim, 8, backend, threads=1, runs=3, workdir=tmp_path)
    assert 0 < ms < 5000
    assert vae.tile_share(unet_ms=3.0, decode_ms=1.0) == pytest.approx(0.25)


def test_sd15_style_timing_makes_exactly_the_warm_up_and_runs_asked_for(smoke_teacher, tmp_path):
    calls = []
    hook = smoke_teacher.vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        vae.decode_latency(smoke_teacher.vae, 8, "torch", threads=1, runs=2, workdir=tmp_path, warmup=1)
        assert len(calls) == 3  # 1 warm-up + 2 timed
        calls.clear()
        vae.decode_latency(smoke_teacher.vae, 8, "torch", threads=1, runs=2, workdir=tmp_path)
        assert len(calls) == 4  # time_callable's default: 2 warm-ups
    finally:
        hook.remove()


def test_costs_time_both_vaes_in_interleaved_rounds(smoke_teacher, tmp_path):
    """Teacher and slim are timed round by round, not one after the other, so a slow phase of the machine
    cannot land on one of them only; the study tile warms up each round, the SD tile only in round 1."""
    slim, _ = vae.build(smoke_teacher.vae, "w1/2-l1-na")
    log = []
    def timed_call(name):  # torch calls only: ONNX export traces the module through torch too
        return lambda *_: None if torch.onnx.is_in_onnx_export() else log.append(name)

    hooks = [m.decoder.register_forward_hook(timed_call(name))
             for name, m in (("teacher", smoke_teacher.vae), ("slim", slim))]
    try:
        out = vae.costs(smoke_teacher.vae, slim, smoke_teacher.vae, slim, 8, threads=1, runs=3,
                        workdir=tmp_path, sd15=True, sd15_runs=2)
    finally:
        for h in hooks:
            h.remove()
    # torch decodes: study tile 3 rounds x (warm-up + timed), then SD tile 2 rounds x 1
    assert log.count("teacher") == log.count("slim") == 3 * 2 + 2
    study = "".join(n[0] for n in log[:12])  # t and s, in call order
    assert study.strip("t").strip("s") and study.strip("s").strip("t"), study  # neither t..ts..s nor s..st..t
    assert set(out) == {"embedded_torch", "embedded_onnxruntime", "sd15_torch", "sd15_onnxruntime", "provenance"}
    assert set(out["sd15_torch"]["teacher"]) == {"decode_ms", "encode_ms"}
    assert all(ms > 0 for k, models in out.items() if k != "provenance"
               for m in models.values() for ms in m.values())
    assert out["sd15_torch"]["teacher"]["decode_ms"] > out["sd15_torch"]["slim"]["decode_ms"]  # 512-px tile
    assert out["provenance"]["sd15_runs"] == 2 and "interleaved" in out["provenance"]["timing"]


def test_the_choice_table(smoke_teacher, crops, tmp_path):
    frame, slims = vae.measure_options(
        smoke_teacher.vae, crops[:-4], crops[-4:], steps=2, batch_size=4, lr=1e-3,
        weights=vae.LossWeights(perceptual=0.0), seed=0, latent_px=8, backend="torch", threads=1, runs=1,
        workdir=tmp_path, names=["w1/2", "w1/2-l1", "w1/4-l1"])
    assert list(frame["option"]) == ["teacher", "w1/2", "w1/2-l1", "w1/4-l1"]
    assert frame.loc[2, "same_as"] == "w1/2" and slims["w1/2-l1"] is slims["w1/2"]  # one-layer teacher
    assert (frame["param_ratio"].iloc[1:] > 1).all() and (frame["decode_ms"] > 0).all()
    assert frame["compat_psnr"].iloc[1:].map(math.isfinite).all()
