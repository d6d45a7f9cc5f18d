"""Conversation templates: the original's prompt format and the chat templates of each model type.

A conversation renders as ``system + sep + Σ(role + message + sep)``, with ``<Img><ImageHere></Img>``
where each uploaded image goes (Vicuna V0, Llama-2 as the original; ChatML for the nano model).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from minigpt4.prompts import IMAGE_PLACEHOLDER

IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
STOP_TEXT = "###"


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()


@dataclass
class Conversation:
    """A conversation history and the template that renders it as one prompt string."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]] = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    # Generation stops when the reply spells this (Vicuna's "###"); None: only at EOS, as the
    # original's Llama-2 chat, whose reference run went on past a "###".
    stop_str: str | None = STOP_TEXT
    # The reply is cut where it spells this. The original cut every reply at "###", Llama-2's too,
    # which dropped a Markdown heading a Llama-2 reply wrote; only Vicuna's template does here
    # (dataclasses.replace(CONV_VISION_LLama2, reply_cut="###") is the original's Llama-2 chat).
    reply_cut: str | None = STOP_TEXT
    skip_next: bool = False
    conv_id: Any = None
    # The LLM's KV cache after the last answer; a copy starts without it (see PrefixCache).
    kv_cache: Any = field(default=None, init=False, repr=False, compare=False)

    def get_prompt(self) -> str:
        seps = [self.sep, self.sep2 if self.sep_style == SeparatorStyle.TWO else self.sep]
        prompt = self.system + seps[0] if self.system else ""  # ChatML without a system turn
        for i, (role, message) in enumerate(self.messages):
            # An empty message is the turn the model is about to write: just its role.
            prompt += role + message + seps[i % 2] if message else role
        return prompt

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=copy.deepcopy(self.messages))

    def to_gradio_chatbot(self) -> list[dict[str, str]]:
        """The turns after ``offset`` as Gradio ``messages`` (user, assistant, ...)."""
        out = []
        for i, (_, message) in enumerate(self.messages[self.offset :]):
            if message is not None:
                out.append({"role": "user" if i % 2 == 0 else "assistant", "content": message})
        return out


SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)

CONV_VISION_Vicuna0 = Conversation(
    system=SYSTEM, roles=("Human: ", "Assistant: "), messages=[], offset=2, sep_style=SeparatorStyle.SINGLE, sep="###"
)
CONV_VISION_LLama2 = Conversation(
    system=SYSTEM, roles=("<s>[INST] ", " [/INST] "), messages=[], offset=2, sep_style=SeparatorStyle.SINGLE, sep="",
    stop_str=None, reply_cut=None,
)
# ChatML for the nano model's SmolLM2-Instruct, without a system turn: every token costs on a
# CPU. Its first turn renders exactly as the nano model.prompt_template, so chat feeds the LLM
# what training did; EOS (<|im_end|>) ends a reply.
CONV_VISION_SmolLM2 = Conversation(
    system="",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=[],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="<|im_end|>\n",
    stop_str=None,
    reply_cut=None,
)
CONV_VISION = CONV_VISION_Vicuna0
CONV_TEMPLATES = {
    "pretrain_vicuna0": CONV_VISION_Vicuna0,
    "pretrain_llama2": CONV_VISION_LLama2,
    "nano": CONV_VISION_SmolLM2,
}


def conv_template_for(model_type: str) -> Conversation:
    if model_type not in CONV_TEMPLATES:
        raise ValueError(f"model.model_type: no chat template for '{model_type}'; known: {', '.join(CONV_TEMPLATES)}")
    return CONV_TEMPLATES[model_type]


def clean_reply(text: str, template: Conversation = CONV_VISION_Vicuna0) -> str:
    """The original's post-processing, following the conversation's own template.

    The original cut every reply at ``###`` and kept what follows the last ``Assistant:``, for
    Vicuna and Llama-2 alike. Here the cut is the template's ``reply_cut`` (Vicuna's ``###``) and
    the role is stripped only where the template names the assistant with a colon (Vicuna), so
    a Llama-2 or ChatML reply that contains ``###`` survives.
    """
    if template.reply_cut:
        text = text.split(template.reply_cut)[0]
    role = template.roles[1].strip()
    if role.endswith(":"):
        text = text.split(role)[-1]
    return text.strip()
