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
from .resource import RESOURCES, ResourceModel

__all__ = [
    "KINDS",
    "RESOURCES",
    "UMEC",
    "ADMMConfig",
    "ADMMState",
    "GroupMember",
    "GroupSet",
    "Kept",
    "PackedGroups",
    "ResourceModel",
    "apply_masks_",
    "bottom_k_norm",
    "build_group_sets",
    "kept_from_masks",
    "next_smallest",
]
