"""Chatting with MiniGPT-4: conversation templates, stop words, image checks, the KV cache kept
between turns, and the ``Chat`` engine of the demo, the CLI and the server."""
from minigpt4.conversation.chat import Chat, ContextTooLong
from minigpt4.conversation.images import MAX_IMAGE_PIXELS, ImageError, open_image
from minigpt4.conversation.kv_cache import PrefixCache, common_prefix
from minigpt4.conversation.stopping import StopCriteria
from minigpt4.conversation.templates import (
    CONV_TEMPLATES,
    CONV_VISION,
    CONV_VISION_LLama2,
    CONV_VISION_SmolLM2,
    CONV_VISION_Vicuna0,
    IMAGE_MESSAGE,
    Conversation,
    SeparatorStyle,
    clean_reply,
    conv_template_for,
)

__all__ = [
    "CONV_TEMPLATES",
    "CONV_VISION",
    "CONV_VISION_LLama2",
    "CONV_VISION_SmolLM2",
    "CONV_VISION_Vicuna0",
    "Chat",
    "ContextTooLong",
    "Conversation",
    "IMAGE_MESSAGE",
    "ImageError",
    "MAX_IMAGE_PIXELS",
    "PrefixCache",
    "SeparatorStyle",
    "StopCriteria",
    "clean_reply",
    "common_prefix",
    "conv_template_for",
    "open_image",
]
