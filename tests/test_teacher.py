import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nanosd_lib import baseline, data, photos, teacher, training


def test_topology_is_sd15s(smoke_teacher):
    cfg = smoke_teacher.unet.config
    assert cfg.down_block_types == baseline.SD15_DOWN_BLOCKS and cfg.up_block_types == baseline.SD15_UP_BLOCKS
    assert type(smoke_teacher.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert cfg.layers_per_block == 2
    assert len(smoke_teacher.vae.config.down_block_types) == 4  # factor 8
    assert smoke_teacher.vae.config.latent_channels == 4


def test_each_caption_word_is_one_token(smoke_teacher):
    tok = smoke_teacher.tokenizer
    for caption in photos.captions():
        ids = tok(caption).input_ids
        assert len(ids) == len(caption.split()) + 2, caption  # + start and end tokens
        assert len(ids) <= tok.model_max_length
    assert tok.decode(tok("a tabby cat").input_ids, skip_special_tokens=True) == "a tabby cat"


def test_save_load_roundtrip_is_exact(smoke_teacher, smoke_teacher_dir):
    assert (smoke_teacher_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((smoke_teacher_dir / "model_index.json").read_text())["unet"][1] == \
        "UNet2DConditionModel"
    loaded = teacher.load(smoke_teacher_dir)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(smoke_teacher, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("a red motorcycle").input_ids == \
        smoke_teacher.tokenizer("a red motorcycle").input_ids


def test_the_real_pipeline_loads_our_folder(smoke_teacher_dir):
    pipe = StableDiffusionPipeline.from_pretrained(smoke_teacher_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a tabby cat", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        teacher.load(tmp_path / "nope")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae/, text_encoder/, tokenizer/, scheduler/"):
        teacher.load(tmp_path)


def _train_briefly(seed):
    model = teacher.build(teacher.SPECS["smoke"], photos.captions(), seed)
    gen = torch.Generator().manual_seed(seed)
    names = ["chelsea", "coffee"]
    pics = [data.to_tensor(photos.bundled(n)) for n in names]
    crops, _ = data.random_crops(pics, 32, 32, gen)
    vae_log = training.train_vae(model, crops, 5, 8, 1e-3, 1e-6, gen)
    latents = training.latent_set(model, pics, [photos.CATALOGUE[n].caption for n in names], 32, gen, 0.1,
                                  set_scale=True)
    batch = training.eval_batch(latents, 32, seed + 1)
    before = training.denoise_loss(model.unet, batch)
    unet_log = training.train_unet(model.unet, latents, 30, 8, 3e-3, gen)
    unet_log.append({"before": before, "after": training.denoise_loss(model.unet, batch)})
    return model, vae_log, unet_log


def test_training_is_deterministic_and_lowers_the_loss():
    a, vae_a, unet_a = _train_briefly(0)
    b, vae_b, unet_b = _train_briefly(0)
    assert vae_a == vae_b and unet_a == unet_b
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    assert unet_a[-1]["after"] < 0.9 * unet_a[-1]["before"]  # the fixed-batch denoising loss falls


def test_the_vae_tune_leg_trains_on_its_larger_crops():
    """The second leg runs on its own crops, continues the step count, logs quality at each leg's end,
    and lowers the reconstruction error on crops of its size."""
    model = teacher.build(teacher.SPECS["smoke"], photos.captions(), 0)
    gen = torch.Generator().manual_seed(0)
    pics = [data.to_tensor(photos.bundled(n)) for n in ("chelsea", "coffee")]
    small, _ = data.random_crops(pics, 64, 32, gen)
    large, _ = data.random_crops(pics, 16, 64, gen)
    training.train_vae(model, small, 30, 8, 2e-3, 1e-6, gen)
    before = (training.reconstruct(model.vae, large) - large).abs().mean().item()
    log = training.train_vae(model, small, 20, 8, 1e-3, 1e-6, gen, eval_images=large[:4], evals=2,
                             tune=training.VaePhase(large, 30, 2, 1e-3))
    after = (training.reconstruct(model.vae, large) - large).abs().mean().item()
    assert [r["phase"] for r in log] == [0] * 20 + [1] * 30
    assert [r["step"] for r in log] == list(range(50))
    assert [r["step"] for r in log if "psnr" in r] == [9, 19, 49]  # evals in leg 0, then the end of leg 1
    assert after < before  # 0.314 -> 0.303 on the smoke VAE


def test_prompts_change_samples_from_the_same_noise(smoke_teacher):
    prompts = ["a tabby cat", "a cup of coffee"]
    images = training.sample(smoke_teacher, prompts, seeds=[0, 0], steps=3, guidance=3.0)
    assert torch.equal(images[0, 0], images[0, 1])  # same prompt, same noise: identical
    diff = (images[0, 0] - images[1, 0]).pow(2).mean().sqrt().item()
    assert diff > 1e-3  # a different prompt from the same noise moves the sample
    sep = training.prompt_separation(images)
    assert sep["within_prompt_rms"] == 0.0 and sep["between_prompts_rms"] == pytest.approx(diff)


def test_nan_loss_names_the_step():
    with pytest.raises(FloatingPointError, match="unet: loss became nan at step 7"):
        training.check_finite(torch.tensor(float("nan")), "unet", 7)


def test_the_batched_sampler_equals_the_pipeline(smoke_teacher):
    """`training.generate` (used by the search and the evaluation) draws what the real pipeline draws
    from the same starting noise."""
    from diffusers import StableDiffusionPipeline  # noqa: F401  (the pipeline below is the real one)

    px = smoke_teacher.latent_px
    noise = torch.randn(2, 4, px, px, generator=torch.Generator().manual_seed(3))
    prompts = ["a tabby cat", "a pink flower"]
    ours = training.generate(smoke_teacher, smoke_teacher.unet, smoke_teacher.encode_prompts(prompts), noise,
                             3, 3.0)
    pipe = smoke_teacher.pipeline()
    theirs = pipe(prompts, height=8 * px, width=8 * px, num_inference_steps=3, guidance_scale=3.0,
                  latents=noise.clone(), output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_timesteps_reach_both_ends_and_the_noisy_share_stays_noisy():
    u = torch.tensor([0.0, 0.5, 0.9995, 0.99999994])  # the largest float32 below 1 last
    assert training.timesteps(u, torch.zeros(4, dtype=torch.bool), 1000).tolist() == [0, 500, 999, 999]
    assert training.timesteps(u, torch.ones(4, dtype=torch.bool), 1000).tolist() == [600, 800, 999, 999]


def test_min_snr_weight_keeps_the_zero_snr_step_for_v_prediction(smoke_teacher):
    """Under the zero-terminal-SNR schedule the last step has SNR 0: it must keep a weight, or the
    prediction every sample starts from is never trained."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(smoke_teacher.scheduler.config)
    a = sched.alphas_cumprod
    snr = a / (1 - a).clamp(min=1e-8)
    w = training.min_snr_weight(snr, 5.0, "v_prediction")
    assert snr[-1] == 0 and w[-1] == 1.0
    assert w[0] == pytest.approx(5.0 / (snr[0] + 1))  # the low-noise end is capped, as Min-SNR intends
    assert w.max() == 1.0 and (w[1:] >= w[:-1]).all()  # never above 1, rising with the noise
    eps = training.min_snr_weight(snr[:-1], 5.0, "epsilon")
    assert eps[0] == pytest.approx(5.0 / snr[0]) and eps[-1] == 1.0


def test_the_vae_posterior_starts_nearly_deterministic():
    """The log-variance start is set where the posterior leaves the encoder (after quant_conv)."""
    model = teacher.build(teacher.SPECS["smoke"], photos.captions(), 0)
    gen = torch.Generator().manual_seed(0)
    crops, _ = data.random_crops([data.to_tensor(photos.bundled("chelsea"))], 8, 32, gen)
    assert model.vae.quant_conv is not None  # SD's layout
    training.train_vae(model, crops, 1, 4, 1e-9, 1e-6, gen)  # one step that barely moves a weight
    with torch.no_grad():
        std = model.vae.encode(crops).latent_dist.std
    assert std.max() < 2 * math.exp(training.LOGVAR_INIT / 2)
