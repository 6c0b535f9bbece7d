"""NanoSD, reproduced: a thin library behind the study notebooks."""
import warnings


def quiet_known_warnings() -> None:
    """Silence two library warnings that every BoTorch import and every ONNX export print, which say
    nothing about the study and would put this machine's install paths into the executed notebooks:
    torch's deprecation of `torch.jit.script` (called inside BoTorch) and the ONNX exporter's note that
    it cannot fold strided slices. Any other warning still shows. Set on import of the library, before
    any of its modules imports BoTorch."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1 can be constant folded",
                            category=UserWarning)


quiet_known_warnings()
