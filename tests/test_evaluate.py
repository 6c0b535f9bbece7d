"""Scoring a model's images against the teacher's (stage 07's table), on real MobileNetV2 features."""
import math

import numpy as np
import pytest
import torch

from nanosd_lib import evaluate, quality


def test_score_takes_as_many_images_per_prompt_as_the_scarcest_prompt_has(study_root, monkeypatch):
    """256 images over 36 prompts leaves some prompts 7 and others 8: caption accuracy must use 7 each.
    The images' pooled features are computed once; caption accuracy gets each prompt's rows of them."""
    net = quality.feature_net(study_root)
    g = torch.Generator().manual_seed(0)
    index = torch.arange(11) % 3  # prompts 0 and 1 have 4 images, prompt 2 has 3
    images = torch.rand(11, 3, 32, 32, generator=g)
    reference, labels = torch.rand(6, 3, 32, 32, generator=g), torch.arange(6) % 3
    teacher_images = torch.rand(11, 3, 32, 32, generator=g)
    seen = []
    real = quality.caption_accuracy

    def spy(net_, samples, *args):
        seen.append(samples)
        return real(net_, samples, *args)

    monkeypatch.setattr(quality, "caption_accuracy", spy)
    row = evaluate.score(net, images, evaluate.target(net, teacher_images), index, reference, labels, seed=0)
    (feats,) = seen
    assert feats.shape == (3, 3, 1280)  # 3 prompts x 3 images each: the scarcest prompt's count
    per_prompt = torch.stack([images[index == i][:3] for i in range(3)])  # each prompt's first 3, in order
    np.testing.assert_allclose(feats, quality.pooled_features(net, per_prompt.flatten(0, 1)).reshape(3, 3, -1),
                               rtol=1e-5, atol=1e-6)
    assert row["caption_accuracy_mnv2"] == real(net, per_prompt, reference, labels)["accuracy"]
    full = quality.paired(net, images, teacher_images)  # what the measures were taken from before
    assert row["psnr_vs_teacher"] == pytest.approx(full["psnr"], abs=1e-6)
    assert row["lpips_mnv2_vs_teacher"] == pytest.approx(full["lpips_mnv2"], rel=1e-6)
    assert row["psnr_vs_teacher"] == pytest.approx(10 * math.log10(6), abs=0.5)
