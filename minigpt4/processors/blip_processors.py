"""The BLIP-2 image and caption processors of the original, on torchvision transforms."""
from __future__ import annotations

import re
from typing import Sequence

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from minigpt4.common.registry import registry
from minigpt4.processors.base_processor import BaseProcessor

# CLIP's normalisation, which EVA-CLIP and BLIP-2 kept.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BlipImageBaseProcessor(BaseProcessor):
    """A torchvision pipeline ending in CLIP's normalisation; subclasses set ``self.transform``."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.normalize = transforms.Normalize(mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD)

    def __call__(self, image):
        return self.transform(image)


@registry.register_processor("blip_caption")
class BlipCaptionProcessor(BaseProcessor):
    """Lower-case, strip punctuation, collapse spaces, keep the first ``max_words`` words."""

    def __init__(self, prompt: str = "", max_words: int = 50):
        self.prompt = prompt
        self.max_words = max_words

    def __call__(self, caption: str) -> str:
        return self.prompt + self.pre_caption(caption)

    def pre_caption(self, caption: str) -> str:
        caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
        caption = re.sub(r"\s{2,}", " ", caption)
        caption = caption.rstrip("\n").strip(" ")
        words = caption.split(" ")
        if len(words) > self.max_words:
            caption = " ".join(words[: self.max_words])
        return caption


@registry.register_processor("blip2_image_train")
class Blip2ImageTrainProcessor(BlipImageBaseProcessor):
    random_augmentation = True

    def __init__(self, image_size: int = 224, mean=None, std=None, min_scale: float = 0.5, max_scale: float = 1.0):
        super().__init__(mean, std)
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    image_size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC
                ),
                transforms.ToTensor(),
                self.normalize,
            ]
        )


@registry.register_processor("blip2_image_eval")
class Blip2ImageEvalProcessor(BlipImageBaseProcessor):
    def __init__(self, image_size: int = 224, mean=None, std=None):
        super().__init__(mean, std)
        self.transform = transforms.Compose(
            [
                transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
                transforms.ToTensor(),
                self.normalize,
            ]
        )
