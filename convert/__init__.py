"""PyTorch SVD checkpoints -> svd_jax converted folders. Run once: ``python -m convert SRC DST``."""

from convert.api import CONVERTER_VERSION, convert
from convert.errors import ConversionError

__all__ = ["convert", "ConversionError", "CONVERTER_VERSION"]
