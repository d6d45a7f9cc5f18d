"""EVA-ViT-g as MiniGPT-4 uses it, built on ``timm.models.eva.Eva``.

LAVIS' ``eva_vit_g.pth`` names its parameters exactly as timm does (``blocks.N.attn.qkv.weight``,
``q_bias``/``v_bias``, ``mlp.fc1``...), so loading is a filter: keep the keys of the blocks we
build, drop the 40th block and any head, and resample the position embedding for another
image size. The final norm is Identity because LAVIS returns the last block's output directly.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva

logger = logging.getLogger(__name__)


# timm's eva_giant_patch14_clip_224 is this network with 40 blocks; MiniGPT-4 (via BLIP-2) drops
# the last one. mlp_ratio 4.3637 gives int(1408 * 4.3637) = 6144 hidden units.
EVA_VIT_G = dict(img_size=224, patch_size=14, embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637)
VIT_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_eva_vit(
    vit_config: Mapping[str, Any] | None = None,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    use_grad_checkpoint: bool = False,
    attn_implementation: str = "sdpa",
) -> Eva:
    """EVA-ViT-g (or a smaller shape given by ``vit_config``) returning all tokens, CLS first.

    ``attn_implementation="eager"`` computes attention as LAVIS' EVA did (softmax of ``q @ k.T``
    materialised); ``"sdpa"`` uses ``F.scaled_dot_product_attention``.
    """
    args = {**EVA_VIT_G, **dict(vit_config or {}), "img_size": img_size}
    model = Eva(
        **args,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="",
    )
    model.norm = nn.Identity()
    model.set_grad_checkpointing(use_grad_checkpoint)
    for block in model.blocks:
        block.attn.fused_attn = attn_implementation == "sdpa"
    return model


def eva_vit_key_map(state_dict: Mapping[str, torch.Tensor], model: Eva) -> dict[str, torch.Tensor]:
    """LAVIS EVA state dict -> the keys of ``model``: drop unused blocks/heads, resample pos_embed."""
    wanted = model.state_dict()
    out = {k: v for k, v in state_dict.items() if k in wanted}
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != wanted["pos_embed"].shape:
        new_grid = list(model.patch_embed.grid_size)
        old_side = int(round((pos.shape[1] - model.num_prefix_tokens) ** 0.5))
        logger.info("resampling pos_embed from %dx%d to %dx%d patches", old_side, old_side, *new_grid)
        out["pos_embed"] = resample_abs_pos_embed(
            pos, new_grid, [old_side, old_side], num_prefix_tokens=model.num_prefix_tokens
        )
    return out


def convert_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """``vit_precision: fp16`` (or ``bf16``) as LAVIS' ``convert_weights_to_fp16`` does it.

    Only Linear/Conv weights and biases are cast: LayerNorms, ``cls_token``, ``pos_embed`` and
    the separate ``q_bias``/``v_bias`` stay fp32, which is why the ViT then only runs under autocast.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
