"""Name → class registry for student architectures (the BasicSR pattern).

An architecture module registers itself with ``@ARCH_REGISTRY.register("name")``; checkpoints
store that name as ``family`` and loading looks it up here, so adding a family touches no
loader code. Families are imported on first use: ``compact`` users never pay for importing
diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .student import CTSRStudent

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, modules: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules = dict(modules or {})  # name → module that registers it when imported

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items and name in self._modules:
            importlib.import_module(self._modules[name])
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._modules))


ARCH_REGISTRY: Registry[type[CTSRStudent]] = Registry(
    "architecture", {"compact": "models.archs.compact", "rrdb": "models.archs.rrdb", "sd21": "models.archs.sd21"}
)
