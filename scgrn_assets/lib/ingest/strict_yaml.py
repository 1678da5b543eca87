"""YAML for files a user may get from someone else (catalogs, their lock files): plain data, read as written.

PyYAML's ``safe_load`` runs no code, but it still

* expands aliases, so a 1 KB file of anchors nested nine deep (a "billion laughs") takes
  gigabytes and half a minute before it fails;
* keeps the last of two equal keys, silently;
* reads YAML 1.1 scalars: ``yes``/``off`` become booleans, ``01`` an integer, ``2020-01-01`` a
  date, so a metadata value such as ``yes`` or ``01`` under ``condition.values`` no longer
  matches the text in the metadata table;
* recurses once per nesting level (a 50,000-deep list is a ``RecursionError``) and hands a
  5,000-digit integer to ``int`` (a ``ValueError``): tracebacks, not messages.

:func:`load_strict_yaml` refuses aliases and duplicate keys, reads every mapping key as the
text written (``~``, ``yes``, ``01`` stay strings), and resolves values by YAML 1.2's core
rules (booleans only ``true``/``false``; integers without leading zeros; no dates). Only plain
data is read: explicit tags other than ``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``,
``!!seq`` and ``!!map`` (``!!binary``, ``!!timestamp``, ``!!set``, ...) are refused, so is nesting
deeper than :data:`MAX_DEPTH` levels and an integer longer than Python reads. Errors are
:class:`yaml.YAMLError`, so callers report them as invalid YAML naming their file.

Speed: the values are built straight from the parser's events, one loop with an explicit
stack (no composed node tree, no recursion). The events come from libyaml's C parser when
PyYAML has it (``yaml.__with_libyaml__``), else from PyYAML's pure-Python parser: one reader
either way. A 10,000-study catalog parses in well under a second with libyaml, against about
half a minute through ``SafeLoader``'s composer and constructor (``bench/catalog_scale.py``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("int", "float", "bool", "null")}
_SEQ_TAGS = (None, "!", "tag:yaml.org,2002:seq")
_MAP_TAGS = (None, "!", "tag:yaml.org,2002:map")
#: Nesting levels a file may use (a catalog needs about six); deeper is refused, not recursed into.
MAX_DEPTH = 100

_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLEANS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
# YAML's float forms as SafeLoader reads them (1.5, 1e3 with a dot, .inf, .nan, 1_000.5).
_FLOAT = next(pattern for tag, pattern in yaml.SafeLoader.yaml_implicit_resolvers["."]
              if tag == "tag:yaml.org,2002:float")
_FLOAT_STARTS = frozenset("-+.0123456789")
# SafeLoader's own scalar constructors, for the rare explicit !!int/!!float/!!bool/!!null and for floats.
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_AWAITING_KEY = object()


class StrictYamlError(yaml.YAMLError):
    """Valid YAML we refuse to read: an alias, a duplicate key, a tag beyond plain data, too deep a nesting."""


def load_strict_yaml(text: str) -> Any:
    """Parse one YAML document as plain data (see the module docstring); raises :class:`yaml.YAMLError`."""
    parser = yaml.cyaml.CParser(text) if yaml.__with_libyaml__ else yaml.SafeLoader(text)
    try:
        return _build(parser)
    finally:
        parser.dispose()


class _Frame:
    """A collection being filled: a list, or a dict with the key whose value comes next."""

    __slots__ = ("container", "key", "key_mark")

    def __init__(self, container: list | dict):
        self.container = container
        self.key: Any = _AWAITING_KEY
        self.key_mark = None


def _build(parser) -> Any:
    """The document's value, built from ``parser``'s events in one loop (an explicit stack, no recursion)."""
    get_event = parser.get_event
    get_event()  # StreamStartEvent
    event = get_event()
    if isinstance(event, yaml.StreamEndEvent):
        return None  # an empty file
    stack: list[_Frame] = []
    root: Any = None
    while True:
        event = get_event()
        kind = type(event)
        frame = stack[-1] if stack else None
        if kind is yaml.ScalarEvent:
            if frame is not None and frame.key is _AWAITING_KEY and type(frame.container) is dict:
                key = event.value  # the text as written: `~`, `yes`, `01` stay strings
                if key in frame.container:
                    raise StrictYamlError(f"duplicate key {key!r}{event.start_mark}; keep one")
                frame.key = key
                continue
            value = _scalar(event)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            if frame is not None and frame.key is _AWAITING_KEY and type(frame.container) is dict:
                raise StrictYamlError(f"a mapping key must be plain text{event.start_mark}")
            if event.tag not in (_MAP_TAGS if kind is yaml.MappingStartEvent else _SEQ_TAGS):
                raise _tag_refused(event)
            if len(stack) >= MAX_DEPTH:
                raise StrictYamlError(f"values nested more than {MAX_DEPTH} levels deep{event.start_mark}; "
                                      "a catalog or lock file needs a few")
            value = {} if kind is yaml.MappingStartEvent else []
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            stack.pop()
            continue
        elif kind is yaml.AliasEvent:
            raise StrictYamlError(f"aliases (*{event.anchor}) are not allowed{event.start_mark}; "
                                  "write the value out in full")
        elif kind is yaml.DocumentEndEvent:
            break
        else:  # pragma: no cover (the parser emits no other event inside a document)
            raise StrictYamlError(f"unexpected {kind.__name__}{event.start_mark}")

        if frame is None:
            root = value
        elif type(frame.container) is dict:
            frame.container[frame.key] = value
            frame.key = _AWAITING_KEY
        else:
            frame.container.append(value)
        if kind is not yaml.ScalarEvent:
            stack.append(_Frame(value))

    event = get_event()
    if not isinstance(event, yaml.StreamEndEvent):
        raise StrictYamlError(f"expected a single document in the file, but found another{event.start_mark}")
    return root


def _scalar(event: yaml.ScalarEvent) -> Any:
    """A scalar's value: untagged plain text resolved by YAML 1.2's core rules, quoted text as written."""
    tag, value = event.tag, event.value
    if tag is None or tag == "!":
        if not event.implicit[0]:
            return value  # quoted, a block scalar, or `! text`: a string
        if value in _NULLS:
            return None
        boolean = _BOOLEANS.get(value)
        if boolean is not None:
            return boolean
        first = value[:1]
        if first in _FLOAT_STARTS:
            if _INT.fullmatch(value):
                return _int(value, event)
            if _FLOAT.match(value):
                return _construct("tag:yaml.org,2002:float", event)
        return value
    if tag == _STR_TAG:
        return value
    if tag in _SCALAR_TAGS:
        return _construct(tag, event)
    raise _tag_refused(event)


def _int(text: str, event: yaml.ScalarEvent) -> int:
    try:
        return int(text)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        raise StrictYamlError(f"an integer of {len(text.lstrip('+-'))} digits{event.start_mark} is longer than "
                              "any count or setting; write a smaller number, or quote it to keep it as text") from None


def _construct(tag: str, event: yaml.ScalarEvent) -> Any:
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)  # stateless for scalars
    except ValueError:  # an explicit !!int of too many digits, or `!!int x`
        raise StrictYamlError(f"{event.value[:20]!r} ({len(event.value)} characters){event.start_mark} is not a "
                              f"number Python reads as {tag.rsplit(':', 1)[-1]}; fix the value") from None


def _tag_refused(event: yaml.NodeEvent) -> StrictYamlError:
    return StrictYamlError(f"the tag {event.tag} is not allowed{event.start_mark}; catalogs and lock files hold "
                           "plain text, numbers, true/false, lists and mappings")
