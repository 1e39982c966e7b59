"""tapl's argument parser: Lightning's, except that switching a class on the command line starts it afresh.

jsonargparse keeps, when a later source names another class for an option (``--optimizer SGD`` over a config's
``AdamW`` with ``weight_decay: 0.01``), every init arg of the earlier class that the new class also accepts; its
maintainers hold that to be by design and it has no setting. tapl drops them: when a source names a class other
than the one in effect before it, only what that source and the ones after it give for the option is kept, over
the new class's own defaults. Giving init args for the class in effect (``--optimizer.lr 0.1``, or naming the same
class again) still merges with what came before. The sources, in order: the parser's defaults, then each
``--config`` file, and each argument of the command line (a class: ``--optimizer SGD``,
``--optimizer.class_path SGD``, ``--optimizer '{class_path: SGD, ...}'``; its init args: ``--optimizer.momentum
0.9``; a group given whole, such as ``--data data.yaml``).

How: after jsonargparse's own parse, every class-valued option whose class was switched is parsed once more on
its own, from the last switch on, by a parser of that option alone (which has no earlier value to keep).
"""

from __future__ import annotations

import importlib
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

#: The options that read a whole configuration: the parser's ``--config`` and its short form.
_CONFIG_OPTIONS = ("--config", "-c")
_PRINT_CONFIG = "--print_config"
#: What a source gives for an option when it only gives init args (no class).
_NO_CLASS = object()


@dataclass(frozen=True)
class _Source:
    """What one source gives for one class-valued option.

    Args:
        tokens: The option's arguments for a parser of that option alone, named ``--value``.
        names: The class it names (a class path or name, a dict with ``class_path``, or ``None`` for no class),
            or :data:`_NO_CLASS` when it only gives init args.
    """

    tokens: tuple[str, ...]
    names: Any = _NO_CLASS


class TaplArgumentParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` on which switching a class drops the earlier class's init args.

    Only the parsers that ``tapl`` itself builds do so (``restart_switched_classes``); the class parsers that
    jsonargparse makes of this same type for nested init args parse as jsonargparse does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Whether switched classes start afresh (see the module's docstring); set by ``tapl``'s CLI.
        self.restart_switched_classes = False
        #: The type of every option added through this parser, by its key (``optimizer``, ``data.partitioner``).
        self.option_types: dict[str, Any] = {}

    @override
    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        action = super().add_argument(*args, **kwargs)
        # jsonargparse's argument groups run this method too; the groups of a class are recorded by its parser.
        if isinstance(self, TaplArgumentParser):
            self._record_type(args, kwargs)
        return action

    def add_grouped_argument(self, group: Any, *args: Any, **kwargs: Any) -> Any:
        """``group.add_argument(*args, **kwargs)`` for a group of this parser, its type recorded as a plain option's."""
        action = group.add_argument(*args, **kwargs)
        self._record_type(args, kwargs)
        return action

    def _record_type(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        long = [a for a in args if isinstance(a, str) and a.startswith("--")]
        if "type" in kwargs and long:
            self.option_types[long[0][2:]] = kwargs["type"]

    @override
    def add_class_arguments(self, class_type: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> Any:
        added = super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        prefix = f"{nested_key}." if nested_key else ""
        for name, hint in _init_type_hints(class_type).items():
            self.option_types[prefix + name] = hint
        return added

    @override
    def add_subclass_arguments(self, baseclass: Any, nested_key: str, *args: Any, **kwargs: Any) -> Any:
        added = super().add_subclass_arguments(baseclass, nested_key, *args, **kwargs)
        hint = typing.Union[baseclass if isinstance(baseclass, tuple) else (baseclass,)]  # noqa: UP007
        self.option_types[nested_key] = hint if kwargs.get("required", False) else hint | None
        return added

    @override
    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Namespace | None = None, **kwargs: Any
    ) -> Namespace:
        if not (self.restart_switched_classes and self.option_types):  # e.g. the parser of the subcommands
            return super().parse_args(args, namespace, **kwargs)
        args = list(sys.argv[1:] if args is None else args)
        printing = [a for a in args if a == _PRINT_CONFIG or a.startswith(f"{_PRINT_CONFIG}=")]
        cfg = super().parse_args([a for a in args if a not in printing], namespace, **kwargs)
        cfg = self._restart(cfg, lambda key: _command_line_sources(args, key))
        if printing:  # print what was parsed, switches applied, instead of jsonargparse's own parse
            kwargs = {**kwargs, "defaults": False}
            return super().parse_args(printing, cfg, **kwargs)
        return cfg

    @override
    def parse_object(self, obj: Any, namespace: Namespace | None = None, **kwargs: Any) -> Namespace:
        cfg = super().parse_object(obj, namespace, **kwargs)
        if not (self.restart_switched_classes and self.option_types) or not isinstance(obj, Mapping):
            return cfg
        return self._restart(cfg, lambda key: _config_sources(obj, "", key))

    def _restart(self, cfg: Namespace, sources_of: Callable[[str], list[_Source]]) -> Namespace:
        """``cfg`` with every class-valued option whose class a source switched parsed afresh from that source on.

        Args:
            cfg: jsonargparse's parse.
            sources_of: What the sources give for an option, in order, given its key.
        """
        defaults: Namespace | None = None
        for key, hint in self.option_types.items():
            value = cfg.get(key)
            sources = sources_of(key) if _is_class_spec(value) else []
            if not any(source.names is not _NO_CLASS for source in sources):
                continue
            defaults = self.get_defaults() if defaults is None else defaults
            default = defaults.get(key)["class_path"] if _is_class_spec(defaults.get(key)) else None
            switch = _last_switch(hint, sources, default, value["class_path"])
            if switch is not None:
                cfg[key] = _parse_alone(hint, [token for source in sources[switch:] for token in source.tokens])
        return cfg


def _last_switch(hint: Any, sources: list[_Source], default: str | None, final: str) -> int | None:
    """The index of the last source that names a class other than the one in effect before it, if any.

    Args:
        hint: The option's type.
        sources: What the sources give for it, in order (after the parser's default).
        default: The class path of the parser's default, if it is a class.
        final: The class path that the last source naming a class gave.
    """
    naming = [i for i, source in enumerate(sources) if source.names is not _NO_CLASS]
    ends = [*naming[1:], len(sources)]
    resolved: dict[int, str | None] = {len(naming) - 1: final}

    def named(position: int) -> str | None:  # the class that naming source ``position`` gives (with its init args)
        if position not in resolved:
            tokens = [t for source in sources[naming[position] : ends[position]] for t in source.tokens]
            resolved[position] = _class_of(hint, tokens)
        return resolved[position]

    for position in reversed(range(len(naming))):
        before = named(position - 1) if position > 0 else default
        now = named(position)
        if before is None or now is None or not _same_class(before, now):
            return naming[position]
    return None


def _init_type_hints(theclass: Any) -> dict[str, Any]:
    """The annotated parameters of ``theclass``'s initializer (none when they cannot be resolved)."""
    try:
        hints = typing.get_type_hints(theclass.__init__)
    except Exception:  # unresolvable forward references: those options keep jsonargparse's merge
        return {}
    hints.pop("return", None)
    return hints


def _is_class_spec(value: Any) -> bool:
    return isinstance(value, Namespace) and "class_path" in value


def _parse_alone(hint: Any, tokens: list[str]) -> Any:
    """The value of an option of type ``hint`` given ``tokens`` (``--value ...``) and nothing before them."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=hint)
    return parser.parse_args(tokens).value


def _class_of(hint: Any, tokens: list[str]) -> str | None:
    """The class path that ``tokens`` name for an option of type ``hint`` (``None``: no class, or unknown)."""
    try:
        value = _parse_alone(hint, tokens)
    except Exception:  # a class that needs init args given only later: counted as a switch
        return None
    return value["class_path"] if _is_class_spec(value) else None


def _same_class(a: str, b: str) -> bool:
    """Whether two import paths name the same class (``tapl.FedAvg`` and ``tapl.algorithms.FedAvg`` do)."""
    if a == b:
        return True
    try:
        return _import(a) is _import(b)
    except (ImportError, AttributeError):
        return False


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _command_line_sources(args: list[str], key: str) -> list[_Source]:
    """What the command line ``args`` give, in order, for the class-valued option ``key``."""
    sources: list[_Source] = []
    option = f"--{key}"
    position = 0
    while position < len(args):
        name, equals, inline = args[position].partition("=")
        value = inline if equals else (args[position + 1] if position + 1 < len(args) else "")
        consumed = 1 if equals else 2
        if name in _CONFIG_OPTIONS:
            sources += _config_sources(_load_mapping(value), "", key)
        elif name == option:
            sources.append(_Source(("--value", value), _named_by(value)))
        elif name.startswith(f"{option}."):
            sub = name[len(option) + 1 :]
            if sub == "class_path":
                sources.append(_Source(("--value", value), value))
            elif sub != "help":
                sources.append(_Source((f"--value.{sub}", value)))
        elif name.startswith("--") and key.startswith(f"{name[2:]}."):  # a group given whole: --data data.yaml
            sources += _config_sources(_load_mapping(value), name[2:], key)
        else:
            consumed = 1
        position += consumed
    return sources


def _config_sources(config: Mapping[str, Any] | None, prefix: str, key: str) -> list[_Source]:
    """What a configuration (of the group ``prefix``, ``""`` for the whole) gives for the option ``key``."""
    node: Any = config
    for part in key[len(prefix) + 1 :].split(".") if prefix else key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    if isinstance(node, Mapping):
        return [_Source(("--value", json.dumps(node)), node.get("class_path", _NO_CLASS))]
    # A class name is given as the command line would give it (json would quote it: not an import path).
    return [_Source(("--value", node if isinstance(node, str) else json.dumps(node)), node)]


def _named_by(value: str) -> Any:
    """The class that a command-line value of a class-valued option names, or :data:`_NO_CLASS`."""
    loaded = _load(value)
    if isinstance(loaded, str) and Path(loaded).is_file():
        loaded = _load_mapping(loaded)
    if isinstance(loaded, Mapping):
        return loaded.get("class_path", _NO_CLASS)
    return loaded


def _load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _load_mapping(value: str) -> Mapping[str, Any] | None:
    """The configuration that ``value`` holds or names (a file), if it is one."""
    try:
        loaded = _load(Path(value).read_text()) if Path(value).is_file() else _load(value)
    except OSError:
        return None
    return loaded if isinstance(loaded, Mapping) else None
