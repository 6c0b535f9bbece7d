"""Host INT8 on a real smoke-scale student, calibrated on inputs recorded from real sampling."""
import numpy as np
import pytest
import torch

from nanosd_lib import quantize, space, student, surgery


@pytest.fixture(scope="module")
def quantized(smoke_teacher, tmp_path_factory):
    base = surgery.prune(smoke_teacher.unet)[0]
    net = student.from_base(base, space.Arch.parse("e012-d345"))[0]
    calibration = quantize.record_unet_inputs(smoke_teacher, ["a tabby cat", "a red motorcycle"],
                                              steps=4, seed=0, unet=net)
    held_out = quantize.record_unet_inputs(smoke_teacher, ["a pink flower"], steps=4, seed=1,
                                           unet=net)
    q = quantize.quantize_unet(net, calibration, tmp_path_factory.mktemp("int8"))
    return calibration, held_out, q, quantize.compare(q, held_out, threads=1, runs=5)


def test_recorded_inputs_are_batch_1_tiles_of_the_sampling_run(quantized):
    calibration, held_out, _, _ = quantized
    assert len(calibration) == 2 * 4 * 2 and len(held_out) == 4 * 2  # prompts x steps x (un)cond
    first = calibration[0]
    assert list(first["sample"].shape) == [1, 4, 8, 8] and first["timestep"].dtype == torch.int64
    assert len({int(c["timestep"]) for c in calibration}) == 4  # one per step


def test_int8_runs_close_to_fp32_with_under_half_the_weight_bytes(quantized):
    _, _, q, result = quantized
    import onnx

    ops = {n.op_type for n in onnx.load(str(q["int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert result["output_shape"] == [1, 4, 8, 8]
    # measured at smoke: 37-39 dB on a Xeon with VNNI; 35.6 dB on an AVX2-only EPYC, where 8-bit weights
    # (reduce_range off) saturate ONNX Runtime's int8 kernels and gave 24.4 dB
    assert q["reduce_range"] and result["psnr_worst_db"] > 30
    assert q["int8_weight_bytes"] < 0.5 * q["fp32_weight_bytes"]  # measured: 0.36
    assert result["fp32_ms"] > 0 and result["int8_ms"] > 0


def test_psnr_of_a_known_error():
    ref = np.linspace(-1, 1, 1000).astype(np.float32)  # range 2
    assert quantize.psnr_db(ref, ref + 0.02) == pytest.approx(20 * np.log10(2 / 0.02))
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize.quantize_unet(None, [], "/nonexistent")
