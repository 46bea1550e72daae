"""Name → architecture row. Refuses unknown names (listing the known ones) and duplicates.

Torch-free: ``resnet-serve models`` and argument parsing use it in the runtime image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from builder.architectures import ARCHITECTURES, ArchSpec


class UnknownArchitectureError(KeyError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown architecture {self.name!r}; known: {', '.join(self.known)}"


class DuplicateArchitectureError(ValueError):
    pass


class Registry:
    def __init__(self, specs: Iterable[ArchSpec] = ()) -> None:
        self._specs: dict[str, ArchSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ArchSpec) -> ArchSpec:
        if spec.name in self._specs:
            raise DuplicateArchitectureError(f"architecture {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> ArchSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownArchitectureError(name, self._specs) from None

    def names(self) -> list[str]:
        return list(self._specs)

    def __iter__(self) -> Iterator[ArchSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


REGISTRY = Registry(ARCHITECTURES)
