"""What only a GPU can show. Skipped on machines without CUDA (CI has none)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model_section
from minigpt4.models import MiniGPT4

pytestmark = pytest.mark.gpu


def test_fp16_vit_under_autocast_matches_fp32(ref_tensors):
    fp32 = MiniGPT4.from_config(tiny_model_section()).cuda().eval()
    fp16 = MiniGPT4.from_config(tiny_model_section(vit_precision="fp16")).cuda().eval()
    images = ref_tensors["images"].cuda()
    with torch.no_grad():
        a, _ = fp32.encode_img(images)
        b, _ = fp16.encode_img(images)
    torch.testing.assert_close(b.float(), a.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("option", [{"low_resource": True}, {"load_in_4bit": True}])
def test_quantized_llm_loads_and_runs(option, ref_tensors, ref_json):
    pytest.importorskip("bitsandbytes")
    model = MiniGPT4.from_config(tiny_model_section(**option))
    for part in (model.visual_encoder, model.ln_vision, model.Qformer, model.llama_proj):
        part.cuda()
    model.query_tokens.data = model.query_tokens.data.cuda()
    loss = model({"image": ref_tensors["images"].cuda(), "answer": ref_json["answers"]})["loss"]
    assert torch.isfinite(loss)
