"""umec-lightning: resource-constrained compression of DLRM CTR models (UMEC) on Lightning + Hydra."""

__version__ = "0.1.0"
