from __future__ import annotations

import pytest

import minigpt4  # noqa: F401  (registers everything)
from minigpt4.common.registry import Registry, RegistryError, registry


def test_everything_registers_on_import():
    assert registry.get_model_class("mini_gpt4").__name__ == "MiniGPT4"
    assert registry.get_model_class("minigpt4") is registry.get_model_class("mini_gpt4")  # the Sept 2023 name
    for name in ("blip2_image_train", "blip2_image_eval", "blip_caption"):
        assert registry.get_processor_class(name)
    assert registry.get_path("library_root").endswith("minigpt4")
    assert registry.get_path("cache_root")


def test_a_miss_lists_the_known_names():
    with pytest.raises(RegistryError, match=r"unknown model 'mini_gpt5'; known: mini_gpt4, minigpt4"):
        registry.get_model_class("mini_gpt5")
    with pytest.raises(RegistryError, match="blip2_image_eval"):
        registry.get_processor_class("nope")


def test_decorators_register_and_refuse_a_second_owner():
    reg = Registry()

    @reg.register_task("t", "t_alias")
    class T:
        pass

    assert reg.get_task_class("t") is T and reg.get_task_class("t_alias") is T
    with pytest.raises(RegistryError, match="already taken"):

        @reg.register_task("t")
        class U:
            pass

    for kind in ("runner", "builder", "lr_scheduler"):
        with pytest.raises(RegistryError, match="none registered"):
            reg.get_class(kind, "x")
    reg.register("configuration", 1)
    assert reg.get("configuration") == 1 and reg.get("missing", 2) == 2
