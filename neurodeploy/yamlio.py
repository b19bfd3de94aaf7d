"""Strict YAML reading shared by model and profile files."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import NeurodeployError

# Profiles and network.yaml files are a few kB; a larger file is not one of them.
MAX_YAML_BYTES = 4 * 2**20


class _Refused(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, and aliases.

    Aliases are refused because a few hundred bytes of nested aliases expand
    into gigabytes (a "billion laughs" file); profiles share settings through
    ``extends:`` instead.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"alias '*{event.anchor}' at line {event.start_mark.line + 1}: YAML anchors and "
                "aliases are not accepted (profiles share settings with 'extends:')"
            )
        return super().compose_node(parent, index)


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _Refused(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def read_yaml(path: Path, error: type[NeurodeployError]):
    """Parse a YAML file; every problem is one line of ``error`` naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{path}: {size} bytes; a YAML file of ours is at most {MAX_YAML_BYTES}")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
    except _Refused as exc:
        raise error(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{path}: malformed YAML{where}: {' '.join(problem.split())}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
