"""Host INT8: ONNX Runtime static quantisation of a whole U-Net, timed and checked against fp32.

The U-Net is exported to ONNX (fp32), calibrated on inputs recorded from real sampling runs, and
rewritten in QDQ form (QuantizeLinear/DequantizeLinear pairs around each quantized op), the format
NPU toolchains such as AI Hub's also consume. The quantized model is then timed against the fp32
one at a fixed thread count, and its output compared with fp32's on held-out inputs (PSNR, dB).

Choices, and why:
- Weights: int8, symmetric (zero point 0), per output channel, in 7 bits (ONNX Runtime's
  `reduce_range`). On x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC Zen 3) ONNX Runtime multiplies
  uint8 activations by int8 weights with an instruction whose int16 sums saturate: there the smoke
  test's worst PSNR fell from ~37 dB to 24.4 dB with 8-bit weights, and was 35.6 dB with 7-bit ones
  (35.6 dB with uint8 weights too). 7 bits give the same model, and the same accuracy, on every CPU.
  The filters of one layer can differ widely in range once trained; one scale per tensor would spend
  the levels on the largest. (On the untrained smoke model per-channel and per-tensor scored alike:
  36.6 vs 36.8 dB.)
- Activations: uint8, asymmetric. After SiLU and softmax they are far from symmetric around 0, and a
  zero point spends the 256 levels on the range actually used. Min-max calibration: the U-Net's
  outputs feed a sampler that is sensitive to clipped extremes.
- Which ops: Conv, Gemm, and the MatMuls that multiply by a weight: the layers that hold the
  weights and most of the FLOPs. Attention's activation-by-activation MatMuls (scores, scores x
  values) stay in float: with them quantized, ONNX Runtime's CPU ran the embedded U-Net 0.54x as
  fast as fp32 (both operands re-quantized at run time, per head); without them, 1.1x as fast, at
  the same 40.6 dB (1 thread, untrained weights). Normalisations, softmax and elementwise ops stay
  in float too: their CPU kernels gain little, and norm statistics lose accuracy in int8.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quant_pre_process, quantize_static)

from .latency import WholeCall
from .timing import export_onnx, median_ms, ort_session

OPS = ("Conv", "MatMul", "Gemm")  # the weight-bearing ops (activation x activation MatMuls excluded)


@torch.no_grad()
def record_unet_inputs(teacher, prompts: list[str], steps: int, seed: int, guidance: float = 3.0,
                       unet: torch.nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
    """The U-Net's inputs during real sampling runs of the teacher's pipeline (with `unet` in it),
    one batch-1 dict (sample, timestep int64, encoder_hidden_states) per image, step and, with
    guidance > 1, branch of classifier-free guidance (the prompt's and the empty one's)."""
    unet = unet or teacher.unet
    seen = []

    def hook(module, args, kwargs):
        sample, t = args[0], args[1]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        t = torch.as_tensor(t).reshape(-1).long().expand(sample.shape[0])
        for i in range(sample.shape[0]):  # one tile per record: the deployed batch is 1
            seen.append({"sample": sample[i:i + 1].clone(), "timestep": t[i:i + 1].clone(),
                         "encoder_hidden_states": text[i:i + 1].clone()})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        teacher.pipeline(unet)(prompts, num_inference_steps=steps, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        handle.remove()
    return seen


class _Reader(CalibrationDataReader):
    """ONNX Runtime's CalibrationDataReader over recorded inputs, fed by the graph's input names."""

    def __init__(self, inputs: list[dict[str, torch.Tensor]], names: list[str]):
        self._feeds = iter([{n: d[n].numpy() for n in names} for d in inputs])

    def get_next(self):
        return next(self._feeds, None)


def _activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no weight among their inputs (attention's scores and scores x values)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def quantize_unet(unet: torch.nn.Module, calibration: list[dict[str, torch.Tensor]],
                  workdir: str | Path, per_channel: bool = True, reduce_range: bool = True) -> dict:
    """fp32 export, then static INT8 (QDQ) calibrated on `calibration` (dicts of sample, timestep,
    encoder_hidden_states). Returns the two paths, file and weight sizes, the graph's input names
    and the quantizer's wall time. `reduce_range=False` stores 8-bit weights: only accurate on CPUs
    with VNNI (see the module's notes)."""
    if not calibration:
        raise ValueError("calibration is empty; pass inputs recorded by record_unet_inputs")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = workdir / "unet_fp32.onnx", workdir / "unet_int8.onnx"
    names = list(calibration[0])
    kept = export_onnx(WholeCall(unet), tuple(calibration[0].values()), fp32, names)
    # Graph optimisation first: the exporter's graph has ~600 Constant nodes and its norms spelled
    # out in elementwise ops; folded and fused (LayerNorm, Gemm), fewer and larger ops are
    # quantized and calibrated (smoke: 36.7 -> 39.4 dB). Shapes are fixed, so ONNX's own shape
    # inference suffices (no symbolic pass).
    prepared = workdir / "unet_fp32_prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    reader = _Reader(calibration, kept)
    start = time.perf_counter()
    quantize_static(str(prepared), str(int8), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(OPS), per_channel=per_channel, reduce_range=reduce_range,
                    nodes_to_exclude=_activation_matmuls(prepared),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    seconds = time.perf_counter() - start
    return {"fp32": fp32, "int8": int8, "inputs": kept, "fp32_bytes": fp32.stat().st_size,
            "int8_bytes": int8.stat().st_size, "fp32_weight_bytes": sum(weight_bytes(fp32).values()),
            "int8_weight_bytes": sum(weight_bytes(int8).values()),
            "calibration_inputs": len(calibration), "per_channel": per_channel, "reduce_range": reduce_range,
            "quantize_s": seconds}


def weight_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of the graph's stored tensors (weights, biases, scales) by dtype. A file also holds
    the graph itself: at the smoke scale (155k parameters) the QDQ nodes outweigh the 4x saved on
    the weights, so the file alone would not show the saving."""
    import onnx
    from onnx import numpy_helper

    out: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        a = numpy_helper.to_array(t)
        out[str(a.dtype)] = out.get(str(a.dtype), 0) + a.nbytes
    return out


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of `test` against `reference`, the peak being the reference's own range (max - min):
    the U-Net's output (a noise estimate) has no fixed pixel range."""
    mse = float(np.mean((reference.astype(np.float64) - test) ** 2))
    peak = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def compare(quantized: dict, held_out: list[dict[str, torch.Tensor]], threads: int, runs: int = 20
            ) -> dict:
    """fp32 vs INT8 on held-out inputs: output PSNR (mean and worst, dB) and latency (median of
    `runs` after warm-up, on the first input, `threads` threads)."""
    if not held_out:
        raise ValueError("held_out is empty; pass recorded inputs the calibration did not see")
    sessions = {k: ort_session(quantized[k], threads) for k in ("fp32", "int8")}
    feeds = [{n: d[n].numpy() for n in quantized["inputs"]} for d in held_out]
    psnr = []
    for feed in feeds:
        ref, = sessions["fp32"].run(None, feed)
        out, = sessions["int8"].run(None, feed)
        if out.shape != ref.shape:
            raise RuntimeError(f"INT8 output shape {out.shape} differs from fp32's {ref.shape}")
        psnr.append(psnr_db(ref, out))
    ms = {k: median_ms(lambda s=s: s.run(None, feeds[0]), runs) for k, s in sessions.items()}
    return {"psnr_db": float(np.mean(psnr)), "psnr_worst_db": float(np.min(psnr)),
            "fp32_ms": ms["fp32"], "int8_ms": ms["int8"], "speedup": ms["fp32"] / ms["int8"],
            "size_ratio": quantized["int8_bytes"] / quantized["fp32_bytes"],
            "held_out_inputs": len(held_out), "threads": threads, "runs": runs,
            "output_shape": list(ref.shape)}


def quantize_and_compare(teacher, unet: torch.nn.Module, calibration_prompts: list[str], held_out_prompts: list[str],
                         steps: int, seed: int, workdir: str | Path, threads: int, runs: int, *,
                         guidance: float) -> dict:
    """The whole INT8 recipe for one U-Net: record its inputs while sampling the calibration prompts
    with classifier-free `guidance`, quantise, then `compare` on inputs recorded from other prompts and
    another seed. Adds "paths"."""
    calibration = record_unet_inputs(teacher, calibration_prompts, steps, seed, guidance, unet=unet)
    held_out = record_unet_inputs(teacher, held_out_prompts, steps, seed + 1, guidance, unet=unet)
    paths = quantize_unet(unet, calibration, Path(workdir))
    return {**compare(paths, held_out, threads, runs), "paths": paths}


class OrtUNet(torch.nn.Module):
    """An exported U-Net (fp32 or INT8 ONNX, batch 1) behind the U-Net call the samplers make, so the
    quantized model can generate images: each batch row runs as its own batch-1 call."""

    def __init__(self, path: str | Path, inputs: list[str], threads: int, config):
        super().__init__()
        self.session, self.inputs, self.config = ort_session(Path(path), threads), inputs, config

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **extra):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if any(v is not None for v in extra.values()):
            raise TypeError(f"an exported U-Net takes no {sorted(k for k, v in extra.items() if v is not None)}")
        t = torch.as_tensor(timestep).reshape(-1).long().expand(len(sample))
        rows = []
        for i in range(len(sample)):
            feed = {"sample": sample[i:i + 1], "timestep": t[i:i + 1],
                    "encoder_hidden_states": encoder_hidden_states[i:i + 1]}
            out, = self.session.run(None, {n: feed[n].numpy() for n in self.inputs})
            rows.append(torch.from_numpy(out))
        out = torch.cat(rows)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
