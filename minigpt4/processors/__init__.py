from minigpt4.processors.base_processor import BaseProcessor
from minigpt4.processors.blip_processors import (
    Blip2ImageEvalProcessor,
    Blip2ImageTrainProcessor,
    BlipCaptionProcessor,
)

__all__ = ["BaseProcessor", "Blip2ImageEvalProcessor", "Blip2ImageTrainProcessor", "BlipCaptionProcessor"]
