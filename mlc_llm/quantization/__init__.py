"""Weight quantization schemes: `q0*` (plain dtype), `q4*_1` (int4, group 32, NK layout) and `q4f32_cpu` (the same
int4 numbers in 64-row blocks for the CPU kernels).

Convert time uses the numpy functions here; compile time uses the `nn` modules in `layers.py`.
"""
from .scheme import QUANTIZATIONS, Quantization, get_quantization

__all__ = ["QUANTIZATIONS", "Quantization", "get_quantization"]
