"""Targeted feature interventions: edit transcoder features of a flagged step and regenerate from it."""

from crv.interventions.patch import MODES, EditWindow, FeatureEdit, feature_patch
from crv.interventions.regenerate import POSITIONS, Regeneration, intervene, regenerate

__all__ = ["MODES", "POSITIONS", "EditWindow", "FeatureEdit", "Regeneration", "feature_patch", "intervene", "regenerate"]
