"""The processors against the original's outputs (tests/data/fidelity_reference)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import REF
from minigpt4.common.registry import registry


def test_eval_processor_matches_the_original(ref_tensors):
    proc = registry.get_processor_class("blip2_image_eval").from_config({"name": "blip2_image_eval", "image_size": 224})
    images = torch.stack([proc(Image.open(REF / f"img{i}.png").convert("RGB")) for i in range(2)])
    torch.testing.assert_close(images, ref_tensors["images"], atol=1e-6, rtol=0)
    wide = proc(Image.open(REF / "img_wide.png").convert("RGB"))
    torch.testing.assert_close(wide, ref_tensors["wide_processed"], atol=1e-6, rtol=0)


def test_train_processor_crops_to_size(ref_json):
    proc = registry.get_processor_class("blip2_image_train").from_config({"image_size": 224})
    out = proc(Image.open(REF / "img_wide.png").convert("RGB"))
    assert list(out.shape) == ref_json["train_processor_shape"]
    crop = proc.transform.transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.interpolation.value == "bicubic"


def test_caption_processor_matches_the_original(ref_json):
    proc = registry.get_processor_class("blip_caption").from_config(None)
    for raw, expected in ref_json["captions"]:
        assert proc(raw) == expected, raw


def test_caption_prompt_and_max_words():
    proc = registry.get_processor_class("blip_caption").from_config({"prompt": "a photo of ", "max_words": 3})
    assert proc("One two three four five") == "a photo of one two three"


def test_bad_processor_config_names_the_class():
    with pytest.raises(ValueError, match="Blip2ImageEvalProcessor: bad processor config"):
        registry.get_processor_class("blip2_image_eval").from_config({"image_size": 224, "colour": "red"})
