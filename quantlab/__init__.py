"""quantlab: low-bit post-training quantization of SwinIR-light (2DQuant, CondiQuant)."""
from .checkpoints import load_model, save_model
from .evaluation import evaluate
from .quant import QuantConfig, quantize
from .runtime import pick_device, reuse_freed_memory
from .swinir import SwinIR, SwinIRConfig

__all__ = ["QuantConfig", "SwinIR", "SwinIRConfig", "evaluate", "load_model", "pick_device", "quantize",
           "reuse_freed_memory", "save_model"]
__version__ = "0.1.0"

reuse_freed_memory()
