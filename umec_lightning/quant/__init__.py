"""Quantization of built models for serving (issue 27): row-wise quantized embedding tables (`rowwise`, `sparse`),
fp16/bf16 dense weights and byte accounting (`apply`)."""

from .apply import HalfStoredLinear, dense_to_half, model_bytes, quantize_tables
from .rowwise import BITS, RowwiseTable, dequantize_rows, fake_quantize_rows, quantize_rows, storage_bytes
from .sparse import QuantizedSparseArch

__all__ = [
    "BITS", "RowwiseTable", "quantize_rows", "dequantize_rows", "fake_quantize_rows", "storage_bytes",
    "QuantizedSparseArch", "quantize_tables", "dense_to_half", "HalfStoredLinear", "model_bytes",
]
