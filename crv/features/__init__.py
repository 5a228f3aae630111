"""What transcoder features mean: activation examples, WeightLens and CircuitLens descriptions.

- :mod:`crv.features.corpus`: the token sequences descriptions are read from (the model's own traces).
- :mod:`crv.features.weightlens`: input and output tokens of each feature from its weights alone.
- :mod:`crv.features.describe`: one pass over the corpus (activation examples, co-activation, CircuitLens)
  and the description store saved beside the transcoder set.
- :mod:`crv.features.card`: one feature's card (``crv feature L:IDX``, ``GET /v1/features/{layer}/{index}``)
  and circuit-tracer's feature-file layout.
"""
