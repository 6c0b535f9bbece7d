"""A restorer saved by stage 08 comes back identical, and restores a photo file of any size in one call."""
import pytest
import torch
from torchvision.io import decode_image, write_png

from nanosd_lib import restore


@pytest.fixture(scope="module")
def restorer(smoke_teacher):
    return restore.Restorer(smoke_teacher.vae, smoke_teacher.unet, smoke_teacher.scheduler.config,
                            smoke_teacher.encode_prompts([""]), 500).eval()


@pytest.mark.parametrize("task", restore.TASKS)
def test_a_saved_restorer_loads_back_and_restores_a_file(restorer, task, tmp_path):
    folder = restore.save(restorer, tmp_path / task, task, tile=32, overlap=8)
    loaded, meta = restore.load(folder)
    assert meta["task"] == task and meta["timestep"] == 500 and (meta["tile_px"], meta["overlap_px"]) == (32, 8)
    photo = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(photo), restorer(photo))  # same weights, prompt, timestep, scheduler

    source = tmp_path / "in.png"
    write_png(photo[0].mul(255).round().to(torch.uint8), str(source))
    restore.main([str(source), str(tmp_path / "out.png"), "--restorer", str(folder), "--threads", "1"])
    written = decode_image(str(tmp_path / "out.png"))
    scale = 4 if task == "sr_x4" else 1  # x4 SR takes the low-resolution photo
    assert tuple(written.shape) == (3, 40 * scale, 56 * scale)
    again = restore.restore_file(folder, source, tmp_path / "again.png")
    assert torch.equal(again[0].mul(255).round().to(torch.uint8), written)


def test_a_folder_without_a_restorer_is_refused(tmp_path, restorer):
    with pytest.raises(FileNotFoundError, match="holds no restorer.json: run the restore_photos stage"):
        restore.load(tmp_path)
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        restore.save(restorer, tmp_path / "x", "deblur", 32, 8)
