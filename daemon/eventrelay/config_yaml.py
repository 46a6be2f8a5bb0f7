"""From a file to checked Python values: reading with limits, strict YAML, ${VAR} expansion, and `Reader`.

config.py knows what the configuration says; this module knows how any section of it is read. The target
modules (delivery/targets/) parse their own `configuration` section with a `Reader`, so they depend on
this module and not on config.py, which depends on them through the registry.
"""

from __future__ import annotations

import re
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .text import quoted

MAX_FILE_SIZE = 1024 * 1024  # bytes; a thousand integrations take a few hundred KiB
MAX_NODES = 200_000  # values in the document once its aliases are expanded
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The file cannot be used. `errors` holds every problem found, each prefixed by its path."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(f"  {e}" for e in errors))


def read_text(path: Path) -> str:
    """The file's text; ConfigError when it cannot be read, is not UTF-8, or is too large to be a config."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_SIZE + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    if len(raw) > MAX_FILE_SIZE:
        raise ConfigError(str(path), [f"larger than {MAX_FILE_SIZE // 1024 ** 2} MiB: that is not a configuration "
                                      "file eventrelay should read (is it the right file?)"])
    return text


def load_yaml(text: str, name: str) -> Any:
    """The document as plain values; ConfigError (one line, with its position) when it is not usable YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(name, [_yaml_message(e)]) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # PyYAML's constructors let these out for bad tagged scalars (!!int abc, 2001-13-45) and deep nesting.
        raise ConfigError(name, [f"invalid YAML: a value cannot be read ({type(e).__name__}: {quoted(e)})"]) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last, hiding a typo) and documents
    whose aliases expand past MAX_NODES: a few hundred bytes of nested aliases can stand for billions of
    values, which everything that walks the result would visit one by one."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)  # raises PyYAML's own "expected a mapping" error
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a list or mapping cannot be a key", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Raise a YAMLError when `root` would expand to more than MAX_NODES values or refers to itself."""
    sizes: dict[int, int] = {}  # id(node) -> its values once every alias is expanded
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in in_progress:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the value that contains it",
                                              node.start_mark)
        in_progress.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"the document expands to more than {MAX_NODES:,} values (aliases nested "
                    "too deep or used too often)", node.start_mark)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return f"{where}invalid YAML: {problem}"


def expand_env(value: Any, path: str, environ: Mapping[str, str], errors: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in string values (not keys); `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: expand_env(v, join(path, k), environ, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", environ, errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        var, default = m.group(1), m.group(2)
        if var in environ:
            return environ[var]
        if default is not None:
            return default
        errors.append(f"{path}: environment variable {var} is not set "
                      f"(set it, or write ${{{var}:-}} to allow it to be empty)")
        return ""

    return _ENV.sub(substitute, value)


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def default(cls: type, name: str) -> Any:
    """The default the dataclass `cls` declares for its field `name`: readers take it from there, so each
    default is written once, next to the field it belongs to."""
    declared = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    if declared.default is not MISSING:
        return declared.default
    if declared.default_factory is not MISSING:
        return declared.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


class Reader:
    """Reads decoded YAML section by section, appending `path: problem` to `errors` instead of raising, so
    one pass reports every problem of the file."""

    def __init__(self, errors: list[str], base: Path):
        self.errors = errors
        self.base = base  # relative file paths are read from here: the config file's folder

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def section(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """`value` as a mapping whose keys are all in `allowed` (each other key is an error); {} if absent."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path or "<top level>", "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                hint = _closest(str(key), allowed)
                self.error(join(path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else
                                                             f" (allowed: {', '.join(allowed)})"))
        return value

    def value(self, section: dict[str, Any], key: str, path: str, convert: Callable[[Any], Any], default: Any,
              nullable: bool = False) -> Any:
        """Convert section[key]; missing → default; null → None where null means "off", else default."""
        if key not in section:
            return default
        if section[key] is None:
            return None if nullable else default
        try:
            return convert(section[key])
        except (ValueError, OverflowError) as e:
            self.error(join(path, key), str(e) if isinstance(e, ValueError) else f"{quoted(section[key])} is too large")
            return default

    def path(self, value: Any) -> Path:
        """A file path; a relative one is relative to the config file's folder."""
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path")
        try:
            p = Path(value).expanduser()
        except RuntimeError as e:  # ~user of an unknown user
            raise ValueError(f"{value!r}: {e}") from None
        return p if p.is_absolute() else (self.base / p)

    def existing_file(self, value: Any) -> Path:
        p = self.path(value)
        if not p.is_file():
            raise ValueError(f"{str(p)!r} is not a readable file")
        return p


def _closest(key: str, allowed: tuple[str, ...]) -> str | None:
    import difflib  # only when a key is wrong: a valid file never needs it

    match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    return match[0] if match else None
