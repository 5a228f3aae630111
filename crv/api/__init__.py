"""The online step-verification service (``crv serve``) and the verifier it wraps."""

from crv.api.verifier import StepVerdict, Verifier

__all__ = ["StepVerdict", "Verifier"]
