from .admm import UMEC, ADMMConfig, ADMMState, bottom_k_norm, next_smallest
from .groups import (
    KINDS,
    GroupMember,
    GroupSet,
    PackedGroups,
    apply_masks_,
    build_group_sets,
    kept_from_masks,
)
from .kept import Kept
from .method import CompressionMethod, Extracted, Outcome, finish_and_extract
from .resource import RESOURCES, ResourceModel
from .selection import normalise_by_set, select_groups
from .umec import UMECMethod

__all__ = [
    "KINDS",
    "RESOURCES",
    "UMEC",
    "ADMMConfig",
    "ADMMState",
    "CompressionMethod",
    "Extracted",
    "GroupMember",
    "GroupSet",
    "Kept",
    "Outcome",
    "PackedGroups",
    "ResourceModel",
    "UMECMethod",
    "apply_masks_",
    "bottom_k_norm",
    "build_group_sets",
    "finish_and_extract",
    "kept_from_masks",
    "next_smallest",
    "normalise_by_set",
    "select_groups",
]
