"""One name -> class table per kind, with the lookup names LAVIS users know.

Classes register themselves with a decorator (``@registry.register_model("mini_gpt4")``) and
are found again by name (``registry.get_model_class("mini_gpt4")``). A miss raises
:class:`RegistryError` listing the names that are known, so a typo in a YAML file says what
would have worked.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")

KINDS = ("model", "processor", "builder", "task", "runner", "lr_scheduler")


class RegistryError(LookupError):
    """An unknown name was looked up, or a name was registered twice."""


class Registry:
    def __init__(self) -> None:
        self._classes: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
        self._paths: dict[str, str] = {}
        self._state: dict[str, Any] = {}

    # generic table access --------------------------------------------------------------
    def register_class(self, kind: str, name: str, *aliases: str) -> Callable[[T], T]:
        table = self._classes[kind]

        def wrap(cls: T) -> T:
            for key in (name, *aliases):
                if key in table and table[key] is not cls:
                    raise RegistryError(f"{kind} name '{key}' is already taken by {table[key].__qualname__}")
                table[key] = cls  # type: ignore[assignment]
            return cls

        return wrap

    def get_class(self, kind: str, name: str) -> type:
        table = self._classes[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none registered"
            raise RegistryError(f"unknown {kind.replace('_', ' ')} '{name}'; known: {known}")
        return table[name]

    def list_names(self, kind: str) -> list[str]:
        return sorted(self._classes[kind])

    # the LAVIS names ---------------------------------------------------------------------
    def register_model(self, name: str, *aliases: str):
        return self.register_class("model", name, *aliases)

    def register_processor(self, name: str, *aliases: str):
        return self.register_class("processor", name, *aliases)

    def register_builder(self, name: str, *aliases: str):
        return self.register_class("builder", name, *aliases)

    def register_task(self, name: str, *aliases: str):
        return self.register_class("task", name, *aliases)

    def register_runner(self, name: str, *aliases: str):
        return self.register_class("runner", name, *aliases)

    def register_lr_scheduler(self, name: str, *aliases: str):
        return self.register_class("lr_scheduler", name, *aliases)

    def get_model_class(self, name: str) -> type:
        return self.get_class("model", name)

    def get_processor_class(self, name: str) -> type:
        return self.get_class("processor", name)

    def get_builder_class(self, name: str) -> type:
        return self.get_class("builder", name)

    def get_task_class(self, name: str) -> type:
        return self.get_class("task", name)

    def get_runner_class(self, name: str) -> type:
        return self.get_class("runner", name)

    def get_lr_scheduler_class(self, name: str) -> type:
        return self.get_class("lr_scheduler", name)

    # paths and run state -----------------------------------------------------------------
    def register_path(self, name: str, path: str) -> None:
        self._paths[name] = str(path)

    def get_path(self, name: str) -> str:
        if name not in self._paths:
            raise RegistryError(f"unknown path '{name}'; known: {', '.join(sorted(self._paths))}")
        return self._paths[name]

    def register(self, name: str, obj: Any) -> None:
        self._state[name] = obj

    def get(self, name: str, default: Any = None) -> Any:
        return self._state.get(name, default)


registry = Registry()
