from .cost import Cost, linear_flops, measure
from .dlrm import DLRM, MLP, Factored, InteractionArch, SparseArch
from .structure import DLRMStructure, dense_structure

__all__ = [
    "DLRM", "MLP", "Factored", "InteractionArch", "SparseArch", "DLRMStructure", "dense_structure",
    "Cost", "measure", "linear_flops",
]
