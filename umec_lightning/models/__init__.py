from .cost import Cost, linear_flops, measure
from .dlrm import DLRM, MLP, Factored, InteractionArch, SparseArch
from .serve import fold_batch_norm
from .structure import DLRMStructure, dense_structure

__all__ = [
    "fold_batch_norm",
    "DLRM", "MLP", "Factored", "InteractionArch", "SparseArch", "DLRMStructure", "dense_structure",
    "Cost", "measure", "linear_flops",
]
