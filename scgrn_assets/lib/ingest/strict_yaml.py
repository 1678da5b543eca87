"""YAML for files a user may get from someone else (catalogs, their lock files): plain data, read as written.

PyYAML's ``safe_load`` runs no code, but it still

* expands aliases, so a 1 KB file of anchors nested nine deep (a "billion laughs") takes
  gigabytes and half a minute before it fails;
* keeps the last of two equal keys, silently;
* reads YAML 1.1 scalars: ``yes``/``off`` become booleans, ``01`` an integer, ``2020-01-01`` a
  date, so a metadata value such as ``yes`` or ``01`` under ``condition.values`` no longer
  matches the text in the metadata table.

:func:`load_strict_yaml` refuses aliases and duplicate keys, reads every mapping key as the
text written (``~``, ``yes``, ``01`` stay strings), and resolves values by YAML 1.2's core
rules (booleans only ``true``/``false``; integers without leading zeros; no dates). Errors are
:class:`yaml.YAMLError`, so callers report them as invalid YAML naming their file.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class StrictYamlError(yaml.YAMLError):
    """An alias or a duplicate key: valid YAML we refuse to read."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases, duplicate keys or YAML 1.1's implicit booleans, octals and dates."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise StrictYamlError(f"aliases (*{event.anchor}) are not allowed{event.start_mark}; "
                                  "write the value out in full")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise StrictYamlError(f"a mapping key must be plain text{key_node.start_mark}")
            key = key_node.value  # the text as written: `~`, `yes`, `01` stay strings
            if key in mapping:
                raise StrictYamlError(f"duplicate key {key!r}{key_node.start_mark}; keep one")
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))


def load_strict_yaml(text: str) -> Any:
    """Parse one YAML document as plain data (see the module docstring); raises :class:`yaml.YAMLError`."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
