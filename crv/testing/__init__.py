"""Oracles for tests and benchmarks, never imported by the library: circuit-tracer as a peer
(:mod:`crv.testing.peer`) and crv's own exactness checks (:mod:`crv.testing.checks`)."""
