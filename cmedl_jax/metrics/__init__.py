"""Segmentation metrics: DSC, surface Dice and HD95 in 2D/3D, per volume and per lesion.

Host (numpy/scipy) reference implementation in :mod:`~cmedl_jax.metrics.surface`, a jitted on-device one in
:mod:`~cmedl_jax.metrics.jax_surface`, per-lesion evaluation in :mod:`~cmedl_jax.metrics.lesions`. Definitions,
conventions and the empty-case policy: docs/metrics.md.
"""

from cmedl_jax.metrics.jax_surface import surface_metrics_jax
from cmedl_jax.metrics.lesions import FalsePositiveComponent, LesionEvaluation, LesionMetrics, evaluate_lesions
from cmedl_jax.metrics.surface import (
    BOTH_EMPTY_DICE,
    BOTH_EMPTY_HAUSDORFF_MM,
    BOTH_EMPTY_SURFACE_DICE,
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DEFAULT_EMPTY_POLICY,
    EMPTY_POLICIES,
    ONE_EMPTY_DICE,
    ONE_EMPTY_SURFACE_DICE,
    SegmentationMetrics,
    SurfaceDistances,
    compute_surface_distances,
    dice,
    hd95,
    one_empty_hausdorff_mm,
    robust_hausdorff,
    segmentation_metrics,
    surface_dice,
)

__all__ = [
    "BOTH_EMPTY_DICE",
    "BOTH_EMPTY_HAUSDORFF_MM",
    "BOTH_EMPTY_SURFACE_DICE",
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "DEFAULT_EMPTY_POLICY",
    "EMPTY_POLICIES",
    "FalsePositiveComponent",
    "LesionEvaluation",
    "LesionMetrics",
    "ONE_EMPTY_DICE",
    "ONE_EMPTY_SURFACE_DICE",
    "SegmentationMetrics",
    "SurfaceDistances",
    "compute_surface_distances",
    "dice",
    "evaluate_lesions",
    "hd95",
    "one_empty_hausdorff_mm",
    "robust_hausdorff",
    "segmentation_metrics",
    "surface_dice",
    "surface_metrics_jax",
]
