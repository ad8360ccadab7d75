"""umec-lightning: resource-constrained compression of DLRM CTR models (UMEC) on Lightning + Hydra."""

__version__ = "0.1.0"

from .compressed import load_compressed, save_compressed  # noqa: E402
from .data import naming as _data_naming  # noqa: E402,F401  (registers ${umec_data_name:})

__all__ = ["load_compressed", "save_compressed", "__version__"]
