"""Weight quantization schemes: `q0*` (plain dtype) and `q4*_1` (int4, group 32, NK layout).

Convert time uses the numpy functions here; compile time uses the `nn` modules in `layers.py`.
"""
from .scheme import QUANTIZATIONS, Quantization, get_quantization

__all__ = ["QUANTIZATIONS", "Quantization", "get_quantization"]
