"""Instruction prompts: the image placeholder and the prompt lists of ``prompts/*.txt``.

The bottom layer with ``processors``: datasets, models and the conversation templates read
prompts from here, so a data-loader worker never imports a model to learn what ``<ImageHere>`` is.
"""
from __future__ import annotations

import string

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import get_abs_path

IMAGE_PLACEHOLDER = "<ImageHere>"


def template_head(template: str) -> int:
    """Where the text formatted into ``template`` (at its ``{}``) starts: the characters before it."""
    return template.format("\0").index("\0")


def check_template(template: str, key: str = "model.prompt_template") -> None:
    """A prompt template holds one ``{}``, where the prompt goes: without it the prompt (and its
    image) would be dropped silently, as ``str.format`` ignores what it has no field for."""
    if not template:
        return
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ConfigError(f"{key}: {template!r} is not a template ({err}); write {{}} where the prompt goes") from None
    if fields != [""]:
        found = ", ".join("{" + f + "}" for f in fields) or "no field"
        raise ConfigError(f"{key}: {template!r} must hold one {{}} where the prompt goes, not {found} (a literal brace is {{{{ or }}}})")


def load_prompt_list(prompt_path: str | None, prompt_template: str = "", key: str = "model.prompt_path") -> list[str]:
    """The instruction prompts: lines of ``prompt_path`` holding ``<ImageHere>``, templated."""
    check_template(prompt_template)
    if not prompt_path:
        return []
    path = get_abs_path(prompt_path)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file '{prompt_path}'")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if IMAGE_PLACEHOLDER in line]
    if not lines:
        raise ConfigError(f"{key}: '{prompt_path}' has no line containing {IMAGE_PLACEHOLDER}")
    return [prompt_template.format(line) if prompt_template else line for line in lines]
