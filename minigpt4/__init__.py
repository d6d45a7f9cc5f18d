"""MiniGPT-4: frozen EVA-ViT-g + BLIP-2 Q-Former, one trainable projection, frozen Vicuna/Llama-2.

Importing the package registers every model, processor, dataset builder, task, runner and lr
scheduler with :data:`minigpt4.common.registry.registry`.
"""
from minigpt4.common.registry import registry
from minigpt4.common import utils as _utils  # registers the library_root and cache_root paths
from minigpt4 import models, processors, datasets, tasks, runners  # noqa: F401  (registration)

__version__ = "0.1.0"
__all__ = ["registry"]
