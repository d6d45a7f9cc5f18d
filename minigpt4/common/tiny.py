"""The tiny EVA and Q-Former shapes of the fidelity reference (``tests/data/fidelity_reference``):
the real model classes at a size that runs in a second on a CPU, for the tests and the benchmarks'
``--tiny`` smoke runs."""

TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 4}
TINY_QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
