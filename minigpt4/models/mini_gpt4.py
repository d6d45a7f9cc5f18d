"""MiniGPT-4: frozen EVA-ViT-g + BLIP-2 Q-Former, one trainable Linear, frozen LLaMA.

Read top to bottom it follows the paper's Figure 1: ``encode_img`` turns an image into LLM-width
tokens (the frozen ``vision_features``, then the trained ``llama_proj``), ``prompt_wrap`` puts them
into the instruction, ``prepare_inputs`` appends the answer and builds the labels, ``forward``
returns the LLM's loss. ``from_config`` builds the parts from YAML and loads the released weights;
the constructor only wires already-built modules together.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from minigpt4.common.config import ConfigError, model_config
from minigpt4.common.feature_cache import vision_fingerprint
from minigpt4.common.registry import registry
from minigpt4.common.utils import get_abs_path, load_state_dict_file, resolve_file, unwrap_state_dict
from minigpt4.models.base_model import BaseModel, check_cpu_precision, checkpoint_entries
from minigpt4.models.eva_vit import VIT_PRECISIONS, build_eva_vit, convert_weights, eva_vit_key_map
from minigpt4.models.qformer import build_qformer, qformer_key, qformer_key_map
from minigpt4.prompts import IMAGE_PLACEHOLDER, load_prompt_list, template_head

logger = logging.getLogger(__name__)

# The Llama-2 variant has no Q-Former: it concatenates this many neighbouring patch tokens.
PATCHES_PER_TOKEN = 4
# The widest row pack_sequences makes: attention over 512 tokens costs LLaMA-7B about 2% of its
# matrix products (4 * 512 * 4096 FLOPs per token and layer against 2 * 202M).
PACK_WIDTH = 512


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so it is safe on fp16 ViT output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class PromptTooLong(ValueError):
    """A prompt with more positions than its caller allows, found before anything is embedded."""

    def __init__(self, positions: int, limit: int):
        super().__init__(f"the prompt is {positions} positions (image tokens included); at most {limit} are allowed")
        self.positions, self.limit = positions, limit


def embed_prompt(
    prompt: str,
    images: Sequence[torch.Tensor],
    tokenizer: Any,
    embed: nn.Module,
    special_tokens: bool = False,
    dtype: torch.dtype | None = None,
    max_positions: int | None = None,
) -> tuple[torch.Tensor, list[Hashable]]:
    """THE place where text and images become LLM input: ``prompt``'s text segments around each
    ``<ImageHere>`` tokenized and embedded, ``images[i]`` (N, H) at placeholder ``i``.

    Training (``prompt_wrap``), chat, batched captioning and the server all call it.
    ``special_tokens`` lets the tokenizer add its own start (BOS) before the first segment, as
    chat does; training adds its BOS prefix separately. Returns the (L, H) embeddings and a key
    per position saying what it was computed from: a token id, or ``(id(image), row)`` (the
    KV-cache reuse between chat turns compares these). ``dtype``: of the result (default the
    embedding's). ``max_positions``: a prompt longer than this raises :class:`PromptTooLong` once
    tokenized, before its embeddings take any memory.
    """
    dtype = dtype or embed.weight.dtype
    segments = prompt.split(IMAGE_PLACEHOLDER)
    if len(segments) != len(images) + 1:
        raise ValueError(f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} but {len(images)} images were given")
    token_ids = [tokenizer(segment, add_special_tokens=special_tokens and i == 0).input_ids for i, segment in enumerate(segments)]
    image_rows = [image.reshape(-1, image.shape[-1]) for image in images]  # (N, H), or chat's (1, N, H)
    positions = sum(map(len, token_ids)) + sum(rows.shape[0] for rows in image_rows)
    if max_positions is not None and positions > max_positions:
        raise PromptTooLong(positions, max_positions)
    device = embed.weight.device
    pieces, keys = [], []
    for i, ids in enumerate(token_ids):
        pieces.append(embed(torch.tensor(ids, dtype=torch.long, device=device)).to(dtype))
        keys += ids
        if i < len(images):
            rows = image_rows[i]
            pieces.append(rows.to(device=device, dtype=dtype))
            keys += [(id(images[i]), row) for row in range(rows.shape[0])]
    return torch.cat(pieces), keys


def span_labels(prompt: str, spans: Sequence[tuple[int, int]], tokenizer: Any, keys: Sequence[Hashable]) -> list[int]:
    """Per position of ``embed_prompt(prompt, ...)``'s output (``keys``): the token id where the
    token's characters lie inside one of ``spans`` ((start, end) characters of ``prompt``: the
    earlier answers of a conversation, trained on too), else -100. A token's leading whitespace
    (LLaMA's ``▁word`` after "Assistant: ") may lie before the span."""
    inside, start = [], 0
    for segment in prompt.split(IMAGE_PLACEHOLDER):
        for a, b in tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
            piece = segment[a:b]
            word = a + len(piece) - len(piece.lstrip())  # where the token's text proper begins
            a, b, word = a + start, b + start, word + start
            inside.append(any(s <= a and b <= e or s <= word < b <= e for s, e in spans))
        start += len(segment) + len(IMAGE_PLACEHOLDER)
    text = iter(inside)
    return [key if isinstance(key, int) and next(text) else -100 for key in keys]


def query_output(Qformer: nn.Module, query_tokens: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former's query outputs (B, num_query_token, hidden) over ViT features; mask all ones."""
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return Qformer(
        query_embeds=query_tokens.expand(image_embeds.shape[0], -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    ).last_hidden_state


class VisionQueries(nn.Module):
    """ViT -> ln_vision -> Q-Former query outputs: the part of MiniGPT-4 before ``llama_proj``, which
    the nano model's vision stages train on their own (MiniGPT-4's names, so their checkpoints load
    into the full model)."""

    def __init__(self, visual_encoder: nn.Module, ln_vision: nn.Module, Qformer: nn.Module, query_tokens: nn.Parameter):
        super().__init__()
        self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens = visual_encoder, ln_vision, Qformer, query_tokens

    @staticmethod
    def trainable_parts(cfg: Mapping[str, Any], model_name: str) -> tuple[nn.Module, nn.Module, nn.Module, nn.Parameter]:
        """``build_vision_parts`` for a model that trains the whole vision side (``model_name`` says
        which, in the errors): it needs a Q-Former, and the ViT in fp32."""
        cfg = model_config(cfg)
        if not cfg.has_qformer:
            raise ConfigError(f"model.has_qformer: the {model_name} trains a Q-Former; set has_qformer: True")
        if cfg.vit_precision != "fp32":
            raise ConfigError(f"model.vit_precision: the {model_name} trains the ViT; set vit_precision: fp32")
        return build_vision_parts(cfg)

    @property
    def queries_width(self) -> int:
        """Width of all query outputs side by side (num_query_token * hidden): a head's input."""
        return self.query_tokens.shape[1] * self.Qformer.config.hidden_size

    def queries(self, image: torch.Tensor) -> torch.Tensor:
        """(B, num_query_token, hidden) query outputs of a batch of images."""
        return query_output(self.Qformer, self.query_tokens, self.ln_vision(self.visual_encoder.forward_features(image)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.queries(image)


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Sample indices in rows of ``width`` tokens: the longest sample opens a row, each next one
    goes into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows


def pack_rows(
    inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) LLM inputs -> (R, W) rows holding whole samples back to back.

    W is 1, 2, 4... times the longest sample (up to ``PACK_WIDTH`` tokens), whichever leaves the
    fewest positions to compute. ``position_ids`` restart at 0 with every sample (and with a
    row's padding tail), and from them transformers builds a causal mask that keeps each sample
    to itself: the loss is the padded batch's. Returns embeddings, position_ids, labels.
    """
    padded = attention_mask.shape[1]
    lengths = attention_mask.sum(dim=1).tolist()
    longest = max(lengths)
    widths = [longest * k for k in (1, 2, 4, 8) if longest * k <= max(longest, PACK_WIDTH)]
    width = min(widths, key=lambda w: len(first_fit_decreasing(lengths, w)) * w)
    rows = first_fit_decreasing(lengths, width)
    index, positions = [], []
    for members in rows:
        for i in members:
            index += range(i * padded, i * padded + lengths[i])
            positions += range(lengths[i])
        tail = -len(index) % width
        index += [-1] * tail  # the row's padding: a sequence of its own, without labels
        positions += range(tail)
    source = torch.tensor(index, device=labels.device).view(len(rows), width)
    padding = source < 0
    source = source.clamp(min=0)
    packed_embeds = inputs_embeds.flatten(0, 1)[source]
    packed_labels = labels.flatten()[source].masked_fill(padding, -100)
    position_ids = torch.tensor(positions, device=labels.device).view(len(rows), width)
    return packed_embeds, position_ids, packed_labels


@registry.register_model("mini_gpt4", "minigpt4")
class MiniGPT4(BaseModel):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_vicuna0": "configs/models/minigpt4_vicuna0.yaml",
        "pretrain_llama2": "configs/models/minigpt4_llama2.yaml",
        "nano": "configs/models/minigpt4_nano.yaml",
    }

    def __init__(
        self,
        visual_encoder: nn.Module,
        ln_vision: nn.Module,
        llama_model: nn.Module,
        llama_tokenizer: Any,
        Qformer: nn.Module | None = None,
        query_tokens: nn.Parameter | None = None,
        *,
        freeze_vit: bool,
        freeze_qformer: bool,
        prompt_list: Sequence[str],
        prompt_template: str,
        max_txt_len: int,
        end_sym: str,
        max_context_len: int,
        low_resource: bool,
        autocast_dtype: torch.dtype,
        logits_on_all_positions: bool,
        pack_sequences: bool,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.ln_vision = ln_vision
        self.Qformer = Qformer
        self.query_tokens = query_tokens
        self.has_qformer = Qformer is not None
        self.llama_model = llama_model
        self.llama_tokenizer = llama_tokenizer
        vision_width = self.Qformer.config.hidden_size if self.has_qformer else visual_encoder.num_features * PATCHES_PER_TOKEN
        self.llama_proj = nn.Linear(vision_width, llama_model.config.hidden_size)
        self.prompt_list = list(prompt_list)
        self.prompt_template = prompt_template
        self.max_txt_len = max_txt_len
        self.end_sym = end_sym
        self.max_context_len = max_context_len
        self.low_resource = low_resource
        self.autocast_dtype = autocast_dtype
        self.logits_on_all_positions = logits_on_all_positions
        self.pack_sequences = pack_sequences
        self.bos_prefix: list[int] = llama_tokenizer("", add_special_tokens=True).input_ids

        # Frozen parts: no gradients, and eval mode (dropout off) even after .train(). An LLM with
        # LoRA adapters trains them: it follows .train() so that peft's lora_dropout (and the
        # gradient checkpointing of an 8-bit LLM) act; its base weights stay frozen all the same.
        has_lora = any("lora_" in name for name, _ in self.llama_model.named_parameters())
        self._frozen: list[nn.Module] = [] if has_lora else [self.llama_model]
        if freeze_vit:
            self._frozen += [self.visual_encoder, self.ln_vision]
        if self.has_qformer and freeze_qformer:
            self._frozen.append(self.Qformer)
            self.query_tokens.requires_grad_(False)
        for module in self._frozen:
            module.requires_grad_(False)
        self._enable_lora_grads()
        self.train()

    def _enable_lora_grads(self) -> None:
        for name, param in self.llama_model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)

    def train(self, mode: bool = True) -> "MiniGPT4":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # ---- image -> LLM tokens ---------------------------------------------------------------
    def encode_img(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> (B, N, llm_hidden) embeddings and their all-ones mask."""
        return self.project_features(self.vision_features(image))

    def vision_features(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen half of ``encode_img``: what ``llama_proj`` reads.

        The Q-Former's query outputs (B, num_query_token, 768), or for the Llama-2 variant the
        patch tokens in groups of four (B, 64, 4 * 1408). With the ViT and Q-Former frozen they
        can be computed once and passed to ``forward`` as ``samples["image_features"]``.
        """
        device = image.device
        if image.dim() > 4:
            image = image.reshape(-1, *image.shape[-3:])
        if self.low_resource:
            # As the original: the ViT runs on the CPU in fp32 next to an 8-bit LLM on the GPU.
            self.visual_encoder.to("cpu").float()
            self.ln_vision.to("cpu").float()
            image = image.to("cpu")
        if image.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            check_cpu_precision(self, llm=False)
        with self.maybe_autocast(self.autocast_dtype):
            image_embeds = self.ln_vision(self.visual_encoder.forward_features(image)).to(device)
            if self.has_qformer:
                return query_output(self.Qformer, self.query_tokens, image_embeds)
            image_embeds = image_embeds[:, 1:, :]  # drop CLS
            bs, pn, hs = image_embeds.shape
            return image_embeds.reshape(bs, pn // PATCHES_PER_TOKEN, hs * PATCHES_PER_TOKEN)

    def frozen_vision(self) -> bool:
        """Whether ``vision_features`` is fixed: the ViT, and the Q-Former where there is one, are frozen."""
        params = [*self.visual_encoder.parameters(), *self.ln_vision.parameters()]
        if self.has_qformer:
            params += [*self.Qformer.parameters(), self.query_tokens]
        return not any(p.requires_grad for p in params)

    def vision_fingerprint(self, **settings: Any) -> str:
        """What ``vision_features`` depends on, as a digest: the feature cache's identity.

        ``settings``: what else changes the features, e.g. the runner's autocast.
        """
        settings.update(autocast_dtype=self.autocast_dtype, vit_dtype=self.visual_encoder.patch_embed.proj.weight.dtype, has_qformer=self.has_qformer)
        return vision_fingerprint([self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens], settings)

    def compile_blocks(self) -> None:
        """``torch.compile`` the repeated units: every ViT block and every LLM decoder layer.

        One compiled graph serves all blocks of a kind, so compilation takes seconds, not the
        minutes a whole-model compile takes. The LLM's batch and sequence length change from step
        to step, so its layers are compiled for any shape from the start. Module names, and so
        checkpoints, are unchanged.
        """
        if getattr(self.llama_model, "is_loaded_in_8bit", False) or getattr(self.llama_model, "is_loaded_in_4bit", False):
            raise ConfigError("run.compile: an 8-bit or 4-bit LLM (low_resource / load_in_4bit) cannot be compiled; turn one of them off")
        for block in self.visual_encoder.blocks:
            block.compile()
        for layer in self.llama_model.get_decoder().layers:
            layer.compile(dynamic=True)

    def project_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vision_features`` -> (B, N, llm_hidden) embeddings through ``llama_proj``, and their mask."""
        with self.maybe_autocast(self.autocast_dtype):
            inputs_llama = self.llama_proj(features)
        atts_llama = torch.ones(inputs_llama.shape[:-1], dtype=torch.long, device=inputs_llama.device)
        return inputs_llama, atts_llama

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.llama_model.get_input_embeddings()(token_ids)

    # ---- instruction around the image --------------------------------------------------------
    def prompt_wrap(
        self,
        img_embeds: torch.Tensor,
        atts_img: torch.Tensor,
        prompts: str | Sequence[str] | None,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each ``<ImageHere>`` of each prompt by that sample's image tokens.

        Returns right-padded embeddings (padding = embedding of the pad id), their mask and their
        labels: -100, but the token ids inside ``spans[i]`` (characters of prompt ``i`` to train
        on: a conversation's earlier answers).
        """
        if not prompts:
            return img_embeds, atts_img, torch.full(atts_img.shape, -100, dtype=torch.long, device=atts_img.device)
        if isinstance(prompts, str):
            prompts = [prompts] * len(img_embeds)
        device = img_embeds.device
        embed = self.llama_model.get_input_embeddings()
        wrapped, wrapped_labels = [], []
        for i, (img, prompt) in enumerate(zip(img_embeds, prompts)):
            # every <ImageHere> of a training prompt is this sample's image
            images = [img] * prompt.count(IMAGE_PLACEHOLDER)
            dtype = torch.promote_types(embed.weight.dtype, img.dtype)
            emb, keys = embed_prompt(prompt, images, self.llama_tokenizer, embed, dtype=dtype)
            wrapped.append(emb[: self.max_context_len])
            # None: nothing in this prompt to train on (every label -100)
            wrapped_labels.append(span_labels(prompt, spans[i], self.llama_tokenizer, keys)[: self.max_context_len] if spans and spans[i] else None)
        max_len = max(len(w) for w in wrapped)
        pad_id = torch.tensor(self.llama_tokenizer.pad_token_id, device=device)
        wrapped_embs = self.embed_tokens(pad_id).expand(len(wrapped), max_len, -1).clone()
        wrapped_atts = torch.zeros(len(wrapped), max_len, dtype=torch.long, device=device)
        labels = torch.full((len(wrapped), max_len), -100, dtype=torch.long, device=device)
        for i, emb in enumerate(wrapped):
            wrapped_embs[i, : len(emb)] = emb
            wrapped_atts[i, : len(emb)] = 1
            if wrapped_labels[i] is not None:
                labels[i, : len(emb)] = torch.tensor(wrapped_labels[i], dtype=torch.long)
        return wrapped_embs, wrapped_atts, labels

    def _instruction(self, samples: Mapping[str, Any]) -> tuple[str | list[str] | None, list[list[tuple[int, int]]] | None]:
        """The prompts around the image, and per prompt the characters to train on in it (the
        ``answer_spans`` of a conversation's earlier answers, moved past the prompt template's head)."""
        spans = samples.get("answer_spans")
        if "instruction_input" in samples:
            instructions = samples["instruction_input"]
            if self.prompt_template:
                if spans:
                    head = template_head(self.prompt_template)
                    spans = [[(start + head, end + head) for start, end in sample] for sample in spans]
                return [self.prompt_template.format(text) for text in instructions], spans
            return list(instructions), spans
        if spans:
            raise ValueError("samples carry answer_spans but no instruction_input for them to point into")
        if self.prompt_list:
            return random.choice(self.prompt_list), None  # one prompt for the whole batch, as the original
        return None, None

    # ---- answer, labels, loss ------------------------------------------------------------------
    def prepare_inputs(self, samples: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``inputs_embeds``, ``attention_mask`` and ``labels`` given to the LLM.

        Per sample: ``[bos] + wrapped input + answer tokens + the input's padding``; labels are
        -100 everywhere but on the answer's (non-pad) tokens, and on the tokens of
        ``samples["answer_spans"]`` inside the instruction (a conversation's earlier answers), when
        given. ``samples["image_features"]``
        (from ``vision_features``: precomputed, or the runner's ``run.feature_cache``), when
        present, stands in for ``samples["image"]``.
        """
        if "image_features" in samples:
            img_embeds, img_atts = self.project_features(samples["image_features"])
        else:
            img_embeds, img_atts = self.encode_img(samples["image"])
        cond_embeds, cond_atts, cond_labels = self.prompt_wrap(img_embeds, img_atts, *self._instruction(samples))

        tokenizer = self.llama_tokenizer
        tokenizer.padding_side = "right"
        regress = tokenizer(
            [answer + self.end_sym for answer in samples["answer"]],
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_txt_len,
            add_special_tokens=False,
        ).to(img_embeds.device)
        regress_ids = regress.input_ids
        regress_embeds = self.embed_tokens(regress_ids)
        part_targets = regress_ids.masked_fill(regress_ids == tokenizer.pad_token_id, -100)

        embs, atts, input_lens = [], [], []
        for i in range(cond_embeds.shape[0]):
            n = int(cond_atts[i].sum())
            input_lens.append(n)
            embs.append(torch.cat([cond_embeds[i, :n], regress_embeds[i], cond_embeds[i, n:]]))
            atts.append(torch.cat([cond_atts[i, :n], regress.attention_mask[i], cond_atts[i, n:]]))
        # The tokenizer's own start: [bos] for LLaMA (as the original), nothing for tokenizers
        # that add no BOS (SmolLM2's ChatML), so training sees what chat will feed the LLM.
        prefix = torch.tensor(self.bos_prefix, dtype=torch.long, device=regress_ids.device).expand(len(embs), -1)
        inputs_embeds = torch.cat([self.embed_tokens(prefix), torch.stack(embs)], dim=1)
        attention_mask = torch.cat([torch.ones_like(prefix), torch.stack(atts)], dim=1)

        labels = torch.full(attention_mask.shape, -100, dtype=torch.long, device=attention_mask.device)
        start = prefix.shape[1]
        for i, target in enumerate(part_targets):
            labels[i, start : start + input_lens[i]] = cond_labels[i, : input_lens[i]]
            labels[i, start + input_lens[i] : start + input_lens[i] + len(target)] = target
        return inputs_embeds, attention_mask, labels

    def forward(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs_embeds, attention_mask, labels = self.prepare_inputs(samples)
        position_ids = None
        if self.pack_sequences:
            inputs_embeds, position_ids, labels = pack_rows(inputs_embeds, attention_mask, labels)
            attention_mask = None  # transformers reads where each sample starts from position_ids
        # use_cache=False: a loss needs no KV cache, which transformers would otherwise keep (always
        # for an LLM without adapters, frozen in eval mode), and with a cache it ignores the sample
        # bounds in position_ids.
        llm_inputs = dict(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, return_dict=True
        )
        if self.logits_on_all_positions:
            # As the original: (B, T, vocab) logits and the LLM's own shifted cross-entropy.
            with self.maybe_autocast(self.autocast_dtype):
                outputs = self.llama_model(**llm_inputs, labels=labels)
            return {"loss": outputs.loss}
        # The LM head runs only at the positions that predict an answer token: the rest of the
        # (B, T, vocab) logits are most of the memory and a good share of the time. The loss is
        # the same mean cross-entropy over the labels as the LLM's own.
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != -100
        with self.maybe_autocast(self.autocast_dtype):
            outputs = self.llama_model(**llm_inputs, logits_to_keep=predicts)
        loss = F.cross_entropy(outputs.logits.float(), labels[:, 1:][predicts[:, :-1]])
        return {"loss": loss}

    # ---- building from YAML ------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], load_weights: bool = True) -> "MiniGPT4":
        """Build from the ``model`` section of a config.

        ``load_weights=False`` builds every part at its configured shape with random weights and
        reads nothing but the LLM's ``config.json`` and tokenizer: with ``torch.device("meta")``
        it shows the real architecture without a byte of weights.
        """
        from minigpt4.models.llm import check_quantization, load_llm, load_llm_tokenizer

        cfg = model_config(cfg)  # every key present, typed and checked; the defaults live in ModelConfig
        # The tokenizer first: a wrong llama_model fails in a second, not after the ViT's download.
        llama_tokenizer = load_llm_tokenizer(cfg.llama_model, cfg.pad_token)
        # Then what else is cheap to check: a missing checkpoint or a quantized LLM without a GPU
        # is said before the vision weights download and before the LLM loads (minutes, at 7B).
        check_quantization(cfg)
        ckpt_files = [str(resolve_file(path, key)) for key, path in checkpoint_entries(cfg.ckpt)] if load_weights else []
        visual_encoder, ln_vision, Qformer, query_tokens = build_vision_parts(cfg, load_weights)
        llama_model = load_llm(cfg, load_weights=load_weights)
        model = cls(
            visual_encoder,
            ln_vision,
            llama_model,
            llama_tokenizer,
            Qformer,
            query_tokens,
            freeze_vit=cfg.freeze_vit,
            freeze_qformer=cfg.freeze_qformer,
            prompt_list=load_prompt_list(cfg.prompt_path, cfg.prompt_template),
            prompt_template=cfg.prompt_template,
            max_txt_len=cfg.max_txt_len,
            end_sym=cfg.end_sym,
            max_context_len=cfg.max_context_len,
            low_resource=cfg.low_resource,
            autocast_dtype=getattr(torch, cfg.autocast_dtype),
            logits_on_all_positions=cfg.logits_on_all_positions,
            pack_sequences=cfg.pack_sequences,
        )
        if ckpt_files:
            # a list loads in order: e.g. the nano model's stage-0 vision weights, then stage 1's llama_proj
            model.load_checkpoints(ckpt_files, key_map=lavis_names_to_ours)
        return model


def build_vision_parts(
    cfg: Mapping[str, Any], load_weights: bool = True
) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Parameter | None]:
    """``visual_encoder``, ``ln_vision``, ``Qformer`` and ``query_tokens`` from a model section.

    Loads the LAVIS EVA and BLIP-2 files named by ``vit_ckpt``/``q_former_model`` (URL or path);
    ``Qformer``/``query_tokens`` are None when ``has_qformer`` is False.
    """
    cfg = model_config(cfg)
    # Files are fetched before the modules are built: a failed download costs no build time.
    vit_ckpt = cfg.vit_ckpt if load_weights else None
    vit_file = resolve_file(vit_ckpt, "model.vit_ckpt") if vit_ckpt else None
    q_former_model = cfg.q_former_model if load_weights and cfg.has_qformer else None
    q_former_file = resolve_file(q_former_model, "model.q_former_model") if q_former_model else None
    visual_encoder = build_eva_vit(
        cfg.vit_config,
        img_size=cfg.image_size,
        drop_path_rate=cfg.drop_path_rate,
        use_grad_checkpoint=cfg.use_grad_checkpoint,
        attn_implementation=cfg.attn_implementation,
    )
    if vit_file is not None:
        state = unwrap_state_dict(load_state_dict_file(vit_file, "model.vit_ckpt"))
        _load_part(visual_encoder, eva_vit_key_map(state, visual_encoder), "model.vit_ckpt", vit_ckpt)
    if cfg.vit_precision != "fp32":
        convert_weights(visual_encoder, VIT_PRECISIONS[cfg.vit_precision])
    ln_vision = LayerNorm(visual_encoder.num_features)
    if not cfg.has_qformer:
        return visual_encoder, ln_vision, None, None

    Qformer = build_qformer(visual_encoder.num_features, cfg.qformer_config, cfg.attn_implementation)
    query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_token, Qformer.config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=Qformer.config.initializer_range)
    if q_former_file is not None:
        # ln_vision is read from this file too, and only when there is a Q-Former:
        # the Llama-2 variant keeps a fresh ln_vision, exactly as the original.
        state = unwrap_state_dict(load_state_dict_file(q_former_file, "model.q_former_model"))
        _load_part(Qformer, qformer_key_map(state), "model.q_former_model", q_former_model)
        ln_state = {k[len("ln_vision.") :]: v for k, v in state.items() if k.startswith("ln_vision.")}
        _load_part(ln_vision, ln_state, "model.q_former_model", q_former_model)
        if "query_tokens" not in state:
            raise ConfigError(f"model.q_former_model: '{q_former_model}' holds no query_tokens")
        if state["query_tokens"].shape != query_tokens.shape:
            raise ConfigError(f"model.q_former_model: '{q_former_model}' holds {list(state['query_tokens'].shape)} query tokens, "
                              f"this model {list(query_tokens.shape)} (model.num_query_token)")
        query_tokens.data.copy_(state["query_tokens"])
    return visual_encoder, ln_vision, Qformer, query_tokens


def _load_part(module: nn.Module, state: Mapping[str, torch.Tensor], key: str, path: str) -> None:
    """Load released weights into one frozen part; every parameter must be covered, at its shape."""
    own = module.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        name, theirs, ours = wrong[0]
        raise ConfigError(
            f"{key}: '{path}' does not fit this model: {len(wrong)} parameter{'s' if len(wrong) > 1 else ''} of another shape, e.g. {name} "
            f"{list(theirs)} in the file, {list(ours)} here (a checkpoint of another model size or layout?)"
        )
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("k_bias")]
    if missing:
        raise ConfigError(f"{key}: the checkpoint lacks {len(missing)} parameters of this shape, e.g. {', '.join(missing[:5])}")
    if result.unexpected_keys:
        logger.warning("%s: ignored %d unexpected keys: %s", key, len(result.unexpected_keys), ", ".join(result.unexpected_keys[:5]))


def lavis_names_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MiniGPT-4 checkpoint written by the original code -> our names (only ``Qformer.*`` differ)."""
    out = {}
    for key, value in state.items():
        if key.startswith("Qformer.bert."):
            new = qformer_key(key[len("Qformer.") :])
            if new is None:
                continue
            key = "Qformer." + new
        out[key] = value
    return out
