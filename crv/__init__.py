"""crv: verify chain-of-thought steps via their attribution graphs."""
__version__ = "0.1.0"
