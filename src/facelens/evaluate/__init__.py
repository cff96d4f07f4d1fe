"""Measuring explanations: streaming metrics (``update``/``compute``), sanity checks, the inpainting game."""

from .agreement import Agreement, spearman, topk_iou
from .base import Metric
from .deletion import DeletionInsertion
from .masking import MaskedConfidence, equal_mass
from .pointing import PointingGame, RegionHit, points_mask
from .runner import METRICS, EvaluationResult, evaluate, write_evaluation

__all__ = ["METRICS", "Agreement", "DeletionInsertion", "EvaluationResult", "MaskedConfidence", "Metric",
           "PointingGame", "RegionHit", "equal_mass", "evaluate", "points_mask", "spearman", "topk_iou",
           "write_evaluation"]
