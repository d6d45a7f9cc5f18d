"""Dataset builders (registered on import), the datasets they build, and the batch streams."""
from minigpt4.datasets import builders  # noqa: F401  (registers laion, cc_sbu, cc_sbu_align, synthetic_shapes, image_text_json)
