"""kimivl-edge: Kimi-VL on laptop and edge CPUs.

    from kimivl_edge import KimiVL
    model = KimiVL.load("Kimi-VL-A3B-Instruct-Q4_K_M.gguf", "mmproj-Kimi-VL-A3B-Instruct-F16.gguf")
"""
from .errors import CheckpointError, ImageError, KimiVLError, UsageError

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not load llama.cpp
    if name in ("KimiVL", "Generation", "Piece", "Stats", "load"):
        from . import model

        return getattr(model, name)
    if name == "SamplingSettings":
        from .sampling import SamplingSettings

        return SamplingSettings
    if name == "convert_checkpoint":
        from .convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(name)


__all__ = ["KimiVL", "Generation", "Piece", "Stats", "SamplingSettings", "load", "convert_checkpoint",
           "KimiVLError", "CheckpointError", "ImageError", "UsageError"]
