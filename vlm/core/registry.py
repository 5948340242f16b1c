"""Exact-name registries with a "did you mean" error for unknown names.

A registry maps names to components. Built-in components are listed *lazily*, as
``"module:attribute"`` strings imported on first :meth:`Registry.get`, so that checking a config
that names ``hf_clip`` never imports open_clip or timm. A component from another package
registers itself eagerly with :meth:`Registry.register` when its module is imported: list that
module under ``plugins:`` in a run config, or declare it in the ``vlm.plugins`` entry-point group
of its package (loaded by :func:`load_entry_point_plugins`). This module imports nothing heavy.

Every entry of every registry follows one protocol, :class:`Component`: an ``Options`` dataclass
(or None), ``build(options, ctx)`` with a typed context of its kind, and ``check(cfg, where)``
for the config rules that belong to it. A kind whose components are plain functions (dataset
readers, image transforms) adapts them with a :class:`FunctionComponent` subclass.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Generic,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    TypeVar,
    Union,
    runtime_checkable,
)

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


@runtime_checkable
class Component(Protocol):
    """What every registered component is (an encoder, a connector, a template, a dataset reader,
    an image transform, an objective, an evaluation task, a distribution strategy):

    - ``Options``: the dataclass of its config options (``model.vision.options``,
      ``model.connector.options``), or None when it takes none. The config's options are checked
      against it (unknown key, wrong type, missing value) by :func:`vlm.app.wiring.validate`.
    - ``build(options, ctx)`` (classmethod): the component built from ``options`` (a mapping of
      its ``Options`` values; None or empty when it takes none) for ``ctx``, a dataclass of what
      its kind is built for (a connector's ``BuildContext``, an encoder's ``EncoderContext``, an
      objective's ``ObjectiveContext``, ...).
    - ``check(cfg, where)`` (classmethod): raise :class:`vlm.core.errors.ConfigError` naming
      ``where`` (the dotted key of ``cfg``, the config section that names the component) for the
      rules of that section that belong to this component. Pure: builds and reads nothing.
    """

    Options: ClassVar[Optional[type]]

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: Any) -> Any:
        ...

    @classmethod
    def check(cls, cfg: Any, where: str) -> None:
        ...


class FunctionComponent:
    """A component written as a plain function, adapted to :class:`Component`: its kind's
    subclass says how ``build`` calls the function (and may ``check``). Calling the adapter calls
    the function, so ``REGISTRY.get(name)(...)`` keeps working."""

    Options: ClassVar[Optional[type]] = None

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(self).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__})"

    def build(self, options: Optional[Mapping[str, Any]], ctx: Any) -> Any:
        raise NotImplementedError

    def check(self, cfg: Any, where: str) -> None:
        """Nothing to check (the default)."""

    @classmethod
    def adapt(cls, obj: Any) -> Any:
        """``obj`` itself when it already follows :class:`Component`, else ``cls(obj)``."""
        return obj if isinstance(obj, Component) else cls(obj)


def missing_protocol(obj: Any) -> list[str]:
    """The members of :class:`Component` that ``obj`` lacks (empty: it follows the protocol)."""
    return [m for m in ("Options", "build", "check") if not hasattr(obj, m)]


class Registry(Generic[T]):
    """A mapping from exact names to components; lookups never guess.

    ``lazy`` maps names to ``"module:attribute"`` strings, imported when first looked up.
    ``adapt`` turns what is registered into a :class:`Component` (e.g. a function into a
    :class:`FunctionComponent`); every entry must follow the protocol (TypeError otherwise).
    """

    def __init__(self, kind: str, lazy: Optional[Mapping[str, str]] = None,
                 adapt: Optional[Callable[[Any], T]] = None):
        self.kind = kind
        self._entries: Dict[str, Union[T, str]] = dict(lazy or {})
        self._lazy = set(self._entries)
        self._adapt = adapt

    def _component(self, name: str, obj: Any) -> T:
        component = self._adapt(obj) if self._adapt is not None else obj
        missing = missing_protocol(component)
        if missing:
            raise TypeError(f"{self.kind} '{name}' ({obj!r}) does not follow the component protocol "
                            f"(vlm.core.registry.Component): it has no {', '.join(missing)}")
        return component

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers a component under `name` (which must be new); it returns
        the object unchanged (the registry holds its adapted form)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = self._component(name, obj)
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
            entry = self._entries[name] = self._component(name, import_object(entry))
            self._lazy.discard(name)
        return entry

    def names(self) -> list[str]:
        """All registered names, sorted (nothing is imported)."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
