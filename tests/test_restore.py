"""A restorer saved by stage 08 comes back identical, and restores a photo file of any size in one call."""
import copy

import pytest
import torch
from torchvision.io import decode_image, write_png

from nanosd_lib import degrade, restore


@pytest.fixture(scope="module")
def restorer(smoke_teacher):
    return restore.Restorer(smoke_teacher.vae, smoke_teacher.unet, smoke_teacher.scheduler.config,
                            smoke_teacher.encode_prompts([""]), 500).eval()


@pytest.mark.parametrize("task", restore.TASKS)
def test_a_saved_restorer_loads_back_and_restores_a_file(restorer, task, tmp_path):
    folder = restore.save(restorer, tmp_path / task, task, tile=32, overlap=8)
    loaded, meta = restore.load(folder)
    assert meta["task"] == task and meta["timestep"] == 500 and (meta["tile_px"], meta["overlap_px"]) == (32, 8)
    assert loaded.scheduler_config == restorer.scheduler_config  # every float exact
    photo = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))  # no multiple of 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(photo), restorer(photo))  # same weights, prompt, timestep, scheduler

    source = tmp_path / "in.png"
    pixels = photo[0].mul(255).round().to(torch.uint8)
    write_png(pixels, str(source))
    threads = torch.get_num_threads()
    restore.main([str(source), str(tmp_path / "out.png"), "--restorer", str(folder), "--threads", "1"])
    assert torch.get_num_threads() == threads  # the command restores the caller's thread count
    written = decode_image(str(tmp_path / "out.png"))
    lq = pixels.float().div(255).unsqueeze(0)
    if task == "sr_x4":  # x4 SR takes the low-resolution photo and upsamples it as training did
        lq = degrade.bicubic_up(lq, (4 * 37, 4 * 53))
    assert tuple(written.shape) == (3, *lq.shape[-2:])
    expected = restore.restore_photo(restorer, lq, 32, 8)[0].mul(255).round()
    assert (expected - written.float()).abs().max() <= 1  # one grey level of rounding; nearest-upsampled input
    # instead of bicubic moves pixels by up to ~200 levels on this restorer (measured: max 219, mean 19)


def test_a_folder_without_a_restorer_is_refused(tmp_path, restorer):
    with pytest.raises(FileNotFoundError, match="holds no restorer.json: run the restore_photos stage"):
        restore.load(tmp_path)
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        restore.save(restorer, tmp_path / "x", "deblur", 32, 8)


def test_tile_latency_times_every_restorer_interleaved(restorer, tmp_path, monkeypatch):
    from nanosd_lib import timing

    seen = []
    real = timing.interleaved_timings

    def spy(calls, rounds, runs, *args, **kwargs):
        seen.append((sorted(calls), rounds, runs))
        return real(calls, rounds, runs, *args, **kwargs)

    monkeypatch.setattr(timing, "interleaved_timings", spy)
    one_conv = torch.nn.Conv2d(3, 3, 1)  # far cheaper than encoder + U-Net + decoder: names can't swap
    restorers = {("sr_x4", "a"): restorer, ("sr_x4", "b"): one_conv}
    ms = restore.tile_latency(restorers, ["a", "b"], "sr_x4", 32, 1, 2, tmp_path, rounds=3,
                              extra={"vae alone": restore.VaeAlone(restorer.vae),
                                     "unet alone": restore.UnetAlone(restorer)})
    assert seen == [(["a", "b", "unet alone", "vae alone"], 3, 2)]  # one interleaved timing, 3 rounds of 2
    assert set(ms) == {"a", "b", "vae alone", "unet alone"} and ms["a"] > ms["b"] > 0
    assert min(ms["vae alone"], ms["unet alone"]) > ms["b"]
    size = {p.stem: p.stat().st_size for p in tmp_path.glob("*.onnx")}
    assert set(size) >= {"a", "b", "vae_alone", "unet_alone"}
    # the U-Net alone carries the U-Net's weights, not the VAE its module also holds: the parts add up
    # to the whole restorer (with the VAE's weights counted twice, the sum would be ~1.5x larger)
    assert 0.9 < (size["unet_alone"] + size["vae_alone"]) / size["a"] < 1.1
    import onnx  # the U-Net alone was exported on the tile's latent, not on the tile

    dims = onnx.load(str(tmp_path / "unet_alone.onnx")).graph.input[0].type.tensor_type.shape.dim
    with torch.no_grad():
        latent = restore.encode(restorer.vae, torch.rand(1, 3, 32, 32))
    assert [d.dim_value for d in dims] == list(latent.shape) == [1, 4, 4, 4]


def test_the_vae_alone_is_the_restorer_without_its_unet(restorer):
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vae = restorer.vae
    assert vae.config.scaling_factor != 1  # so a scale applied on one side only would show
    skip = copy.copy(restorer)
    skip.clean_latent = lambda z: z  # the U-Net's step left out: the latent goes straight to the decoder
    with torch.no_grad():
        alone = restore.VaeAlone(vae)(lq)
        torch.testing.assert_close(alone, skip(lq))
        # and written out with diffusers' calls alone: the scaling factor cancels
        torch.testing.assert_close(alone, vae.decode(vae.encode(lq * 2 - 1).latent_dist.mean).sample.add(1).div(2))


def test_the_parts_of_a_tile_compose_into_the_restorer(restorer, smoke_teacher):
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vae, unet, t = restorer.vae, restore.UnetAlone(restorer), 500
    alpha = smoke_teacher.scheduler.alphas_cumprod[t]
    assert restorer.prediction == "v_prediction"  # the embedded teachers' target
    with torch.no_grad():
        latent = restore.encode(vae, lq)
        torch.testing.assert_close(unet.tile_input(lq), latent)
        # one v-prediction step written out with diffusers' calls: x0 = sqrt(a) z - sqrt(1 - a) v
        v = restorer.unet(latent, torch.tensor([t, t]), encoder_hidden_states=restorer.text.expand(2, -1, -1)).sample
        x0 = alpha.sqrt() * latent - (1 - alpha).sqrt() * v
        torch.testing.assert_close(unet(latent), x0)
        expected = vae.decode(x0 / vae.config.scaling_factor).sample.add(1).div(2)
        torch.testing.assert_close(restore.decode(vae, unet(latent)), expected)
        torch.testing.assert_close(restorer(lq), expected)


def test_degrade_and_restore_draws_each_photo_its_own_input_and_restores_a_repeat_once(restorer, monkeypatch):
    photos = {"a": torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2)),
              "b": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))}
    alone = restore.VaeAlone(restorer.vae)
    calls = []
    real = restore.restore_photo
    monkeypatch.setattr(restore, "restore_photo", lambda r, x, *a: calls.append(r) or real(r, x, *a))
    lq, out = restore.degrade_and_restore({("denoise", "again"): restorer, ("denoise", "one"): restorer,
                                           ("denoise", "vae"): alone}, photos, seed=7, tile=32, overlap=8,
                                          same={"again": "one"})  # a repeat first
    for i, (n, hq) in enumerate(photos.items()):  # photo i drew from seed + i
        drawn = restore.make_lq(hq, "denoise", torch.Generator().manual_seed(7 + i))
        torch.testing.assert_close(lq["denoise", n], drawn)
        torch.testing.assert_close(out["denoise", "one", n], real(restorer, lq["denoise", n], 32, 8))
        assert out["denoise", "again", n] is out["denoise", "one", n] and out["denoise", "vae", n].shape == hq.shape
    assert [id(r) for r in calls] == [id(restorer)] * 2 + [id(alone)] * 2


def test_the_noisy_input_is_plain_gaussian_noise_even_in_dark_and_bright_areas():
    hq = torch.cat([torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)])  # clipping would halve the noise here
    noise = restore.make_lq(hq, "denoise", torch.Generator().manual_seed(0)) - hq
    assert noise.mean().abs() < 0.002 and noise.std().item() == pytest.approx(degrade.DENOISE_SIGMA, rel=0.02)
    sr = restore.make_lq(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "sr_x4",
                         torch.Generator().manual_seed(0))
    assert sr.shape == (2, 3, 64, 64) and 0 <= sr.min() and sr.max() <= 1  # a decoded 8-bit image, upsampled
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        restore.make_lq(hq, "deblur", torch.Generator())
