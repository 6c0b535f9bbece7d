import pytest
import torch
from diffusers import UNet2DConditionModel

from nanosd_lib import baseline, space, student, surgery

SMOKE = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(8, 16, 16, 16), down_block_types=surgery._REQUIRED["down_block_types"],
             up_block_types=surgery._REQUIRED["up_block_types"], cross_attention_dim=16,
             attention_head_dim=2, norm_num_groups=4)


@pytest.fixture(scope="module")
def teacher_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SMOKE).eval()


@pytest.fixture(scope="module")
def base(teacher_unet):
    return surgery.prune(teacher_unet)[0]


def inputs(batch=2, px=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, px, px, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 8, dim, generator=g))


def test_space_counts():
    assert space.space_size() == 32_768
    assert len(space.student_modules()) == 30
    assert sum(1 for _ in space.enumerate_space()) == 32_768


def test_arch_id_round_trips_and_errors_name_the_stage():
    for arch in space.sample(50, seed=1):
        assert space.Arch.parse(arch.id) == arch
    assert space.Arch.teacher().id == "e000-d000"
    with pytest.raises(ValueError, match=r"stage E2: option 5 does not exist; allowed: 0=RARA, 1=RR"):
        space.Arch((0, 5, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="stage D1: option 8 does not exist"):
        space.Arch.parse("e000-d008")
    with pytest.raises(ValueError, match="not of the form 'eXXX-dXXX'"):
        space.Arch.parse("e00-d000")


def test_arch_encodes_to_a_vector_for_the_search():
    assert space.Arch.teacher().vector() == [0.0] * 6
    assert space.Arch.parse("e333-d777").vector() == [1.0] * 6
    assert space.Arch.parse("e100-d007").vector() == [1 / 3, 0, 0, 0, 0, 1.0]
    vectors = {tuple(a.vector()) for a in space.enumerate_space()}
    assert len(vectors) == 32_768  # distinct architectures never collide


def test_prune_maps_every_kept_weight(teacher_unet, base):
    t, b = teacher_unet.state_dict(), base.state_dict()
    for key, value in b.items():
        src = {v: k for k, v in surgery.PREFIX_MAP.items()}
        teacher_key = next((s + key[len(d):] for d, s in src.items() if key.startswith(d)), key)
        assert torch.equal(value, t[teacher_key]), key
    assert base.mid_block is None and len(base.down_blocks) == 3 and len(base.up_blocks) == 3
    assert not base.down_blocks[2].downsamplers


def test_base_keeps_the_unet_call(base):
    sample, t, text = inputs()
    out = base(sample, t, encoder_hidden_states=text)
    assert type(out).__name__ == "UNet2DConditionOutput" and out.sample.shape == sample.shape


def test_teacher_arch_reproduces_the_base_exactly(base):
    nano, log = student.from_base(base, space.Arch.teacher())
    sample, t, text = inputs()
    with torch.no_grad():
        want = base(sample, t, encoder_hidden_states=text).sample
        got = nano(sample, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "stages.D3.resnets.0 <- base.up_blocks.0.resnets.0" in log


def test_shapes_propagate_for_all_32768(base):
    """Each option's (output, skips) shapes, propagated through every combination."""
    sample, t, text = inputs(batch=1)
    sig = {}
    temb = base.time_embedding(base.time_proj(t[:1]))
    h0 = base.conv_in(sample)
    with torch.no_grad():
        enc_in = {"E1": h0}
        for stage in space.ENCODERS:  # encoder signatures: input shape -> (output, skip shapes)
            for i in range(len(space.options(stage))):
                h, skips = student.stage_from_base(base, stage, i)(enc_in[stage], temb, text[:1])
                sig[stage, i] = (tuple(enc_in[stage].shape), tuple(h.shape),
                                 tuple(tuple(s.shape) for s in skips))
            nxt = space.ENCODERS.index(stage) + 1
            if nxt < 3:
                enc_in[space.ENCODERS[nxt]] = torch.zeros(sig[stage, 0][1])
        skips_all = [tuple(h0.shape)] + [s for st in space.ENCODERS for s in sig[st, 0][2]]
        dec_in, pool = sig["E3", 0][1], list(skips_all)
        for stage in space.DECODERS:
            consumed, pool = pool[-3:], pool[:-3]
            size = pool[-1][-2:] if pool else None
            for i in range(len(space.options(stage))):
                out = student.stage_from_base(base, stage, i)(
                    torch.zeros(dec_in), [torch.zeros(s) for s in consumed], temb, text[:1], upsample_size=size)
                sig[stage, i] = (dec_in, tuple(out.shape), tuple(consumed))
            dec_in = sig[stage, 0][1]
    ok = 0
    for arch in space.enumerate_space():
        h = tuple(h0.shape)
        skips = [h]
        for stage, c in zip(space.STAGES, arch.choices):
            want_in, out, extra = sig[stage, c]
            assert want_in == h, (arch.id, stage)
            if stage in space.ENCODERS:
                skips += list(extra)
            else:
                assert list(extra) == skips[-3:], (arch.id, stage)
                skips = skips[:-3]
            h = out
        assert h == tuple(h0.shape) and not skips
        ok += 1
    assert ok == 32_768


def test_a_stage_alone_is_initialised_as_inside_its_candidate(base):
    """Module distillation builds each stage alone; its weights must be the candidate's, option by option."""
    for i in range(8):  # encoders have 4 options and decoders 8: each option of every stage once
        arch = space.Arch(tuple(min(i, len(space.options(s)) - 1) for s in space.STAGES))
        nano, _ = student.from_base(base, arch)
        for stage, option in zip(space.STAGES, arch.choices):
            alone, inside = student.stage_from_base(base, stage, option).state_dict(), nano.stages[stage].state_dict()
            assert alone.keys() == inside.keys(), (arch.id, stage)
            assert all(torch.equal(alone[k], inside[k]) for k in alone), (arch.id, stage)


def test_random_candidates_run_forward(base):
    sample, t, text = inputs()
    for arch in space.sample(6, seed=3):
        nano, _ = student.from_base(base, arch)
        with torch.no_grad():
            out = nano(sample, t, encoder_hidden_states=text).sample
        assert out.shape == sample.shape and torch.isfinite(out).all(), arch.id


def test_params_add_up_per_stage(base):
    table = student.option_params(student.student_config(base))
    for arch in space.sample(5, seed=4):
        nano, _ = student.from_base(base, arch)
        assert baseline.count_params(nano) == student.arch_params(table, arch), arch.id


def test_save_load_round_trip_is_exact(base, tmp_path):
    arch = space.Arch.parse("e213-d467")
    nano, _ = student.from_base(base, arch)
    nano.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "diffusion_pytorch_model.safetensors").is_file()
    back = student.load(tmp_path / "s")
    assert back.arch == arch
    sample, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(nano(sample, t, text).sample, back(sample, t, text).sample)


def test_config_that_does_not_fit_the_weights_is_named(base, tmp_path):
    nano, _ = student.from_base(base, space.Arch.parse("e100-d000"))
    nano.save_pretrained(tmp_path / "s")
    cfg = (tmp_path / "s" / "config.json")
    cfg.write_text(cfg.read_text().replace('"e100-d000"', '"e300-d000"'))
    with pytest.raises(ValueError, match="weights do not match config arch 'e300-d000'"):
        student.load(tmp_path / "s")


def test_student_drops_into_the_sd_pipeline(smoke_teacher):
    base = surgery.prune(smoke_teacher.unet)[0]
    nano, _ = student.from_base(base, space.Arch.parse("e123-d765"))
    pipe = smoke_teacher.pipeline(nano)
    out = pipe("a tabby cat", height=64, width=64, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and (out >= 0).all() and (out <= 1).all()


def test_sd15_width_space_reaches_130m():
    from nanosd_lib import baseline as bl

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**bl.SD15_UNET)
        base = UNet2DConditionModel(**surgery.base_config(teacher.config))
    per_stage = surgery.stage_params(teacher)
    naive = bl.count_params(teacher) - sum(per_stage[s] for s in surgery.REMOVED)
    assert naive == 537_964_484  # deleting the three modules alone
    e3_down = bl.count_params(teacher.down_blocks[2].downsamplers)
    assert bl.count_params(base) == naive - e3_down == 523_217_604  # E3's downsampler fed only D4
    table = student.option_params(student.student_config(base))
    sizes = [student.arch_params(table, a) for a in space.enumerate_space()]
    assert min(sizes) <= 130_000_000 and max(sizes) == 523_217_604
    assert max(s for s in sizes if s < 315_000_000) > 300_000_000  # the family's span is covered


def test_teacher_with_other_topology_is_refused():
    cfg = dict(SMOKE, layers_per_block=1)
    with pytest.raises(ValueError, match="layers_per_block=1; the surgery needs SD-1.5's 2"):
        surgery.base_config(cfg)


def test_unsupported_unet_arguments_are_refused_not_ignored(base):
    nano, _ = student.from_base(base, space.Arch.parse("e123-d456"))
    sample, t, text = inputs()
    nano(sample, t, encoder_hidden_states=text, cross_attention_kwargs=None, timestep_cond=None)  # as the pipeline
    with pytest.raises(TypeError, match=r"does not support \['cross_attention_kwargs'\]"):
        nano(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"scale": 0.5})


def test_slim_groups_keep_the_teachers_channels_per_group():
    from nanosd_lib.blocks import inner_groups

    assert inner_groups(80, 320, 32) == 8 and inner_groups(160, 640, 32) == 8  # SD-1.5, quarter width
    assert inner_groups(8, 32, 8) == 2  # embedded, quarter width: 4 channels a group, as the teacher's
    with pytest.raises(ValueError, match="cannot keep the teacher's 320/32 = 10 channels per GroupNorm group"):
        inner_groups(84, 320, 32)
