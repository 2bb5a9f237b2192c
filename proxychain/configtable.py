"""A TOML table being read: typed getters whose errors name the file and the key.

Validation of a config file happens in one pass over its tables. Each getter takes a key and
a default, checks the value's type, and on a wrong value raises
:class:`~proxychain.errors.ConfigError` with the file, the dotted key (``route[0].breaker``)
and what was expected, so the CLI can print one line instead of a traceback. The table also
remembers which keys were read, so :meth:`ConfigTable.finish` can reject the rest: a typo
must not silently fall back to a default. What the keys mean is :mod:`proxychain.configfile`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["ConfigTable"]


class ConfigTable:
    """A TOML table being read: typed getters that name file and key in every error."""

    def __init__(self, data: Mapping[str, Any], source: str, path: str) -> None:
        self._data = data
        self._source = source
        self._path = path
        self._used: set[str] = set()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, source=self._source, key=self._key(name))

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        self._used.add(name)
        return self._data.get(name)

    def convert(self, name: str, default: Any, parser: Any) -> Any:
        if name not in self._data:
            return default
        try:
            return parser(self.raw(name))
        except ValueError as exc:
            raise self.error(name, f"{exc}, got {self._data[name]!r}") from None

    def string(self, name: str, default: str) -> str:
        value = self.raw(name) if name in self._data else default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value

    def boolean(self, name: str, default: bool | None) -> bool | None:
        value = self.raw(name) if name in self._data else default
        if value is not None and not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self.raw(name) if name in self._data else default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw(name) if name in self._data else []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def table(self, name: str) -> ConfigTable:
        value = self.raw(name) if name in self._data else {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {value!r}")
        return ConfigTable(value, self._source, self._key(name))

    def tables(self, name: str) -> list[ConfigTable]:
        value = self.raw(name) if name in self._data else []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, "expected an array of tables ([[" + name + "]])")
        return [
            ConfigTable(v, self._source, f"{self._key(name)}[{i}]") for i, v in enumerate(value)
        ]

    def finish(self) -> None:
        """Reject unknown keys: a typo must not silently fall back to a default."""
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key")
