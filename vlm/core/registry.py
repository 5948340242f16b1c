"""Exact-name registries with a "did you mean" error for unknown names.

A registry maps names to components. Built-in components are listed *lazily*, as
``"module:attribute"`` strings imported on first :meth:`Registry.get`, so that checking a config
that names ``hf_clip`` never imports open_clip or timm. A component from another package
registers itself eagerly with :meth:`Registry.register` when its module is imported: list that
module under ``plugins:`` in a run config, or declare it in the ``vlm.plugins`` entry-point group
of its package (loaded by :func:`load_entry_point_plugins`). This module imports nothing heavy.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import Callable, Dict, Generic, Iterator, Mapping, Optional, TypeVar, Union

T = TypeVar("T")

ENTRY_POINT_GROUP = "vlm.plugins"
logger = logging.getLogger(__name__)
_entry_points_loaded = False


def closest(name: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def import_object(target: str):
    """The object a ``"package.module:Attribute"`` string names."""
    module_name, _, attribute = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


def load_entry_point_plugins() -> None:
    """Import every installed package's ``vlm.plugins`` entry points (once per process): each
    names a module whose import registers components."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
        logger.debug("loaded vlm plugin %s (%s)", entry.name, entry.value)


class Registry(Generic[T]):
    """A mapping from exact names to components; lookups never guess.

    ``lazy`` maps names to ``"module:attribute"`` strings, imported when first looked up.
    """

    def __init__(self, kind: str, lazy: Optional[Mapping[str, str]] = None):
        self.kind = kind
        self._entries: Dict[str, Union[T, str]] = dict(lazy or {})
        self._lazy = set(self._entries)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers a component under `name` (which must be new)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the component registered under exactly `name` (importing it if listed lazily;
        an unknown name first loads the ``vlm.plugins`` entry points)."""
        if name not in self._entries:
            load_entry_point_plugins()
        try:
            entry = self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(
                f"unknown {self.kind} '{name}'{closest(name, self._entries)}; known: {known}"
            ) from None
        if name in self._lazy:
            entry = self._entries[name] = import_object(entry)
            self._lazy.discard(name)
        return entry

    def names(self) -> list[str]:
        """All registered names, sorted (nothing is imported)."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
