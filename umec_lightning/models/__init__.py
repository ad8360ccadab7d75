from .cost import Cost, linear_flops, measure
from .dlrm import DLRM, MLP, InteractionArch, SparseArch
from .structure import DLRMStructure, dense_structure

__all__ = [
    "DLRM", "MLP", "InteractionArch", "SparseArch", "DLRMStructure", "dense_structure",
    "Cost", "measure", "linear_flops",
]
