"""NanoSD, reproduced: a thin library behind the study notebooks."""
