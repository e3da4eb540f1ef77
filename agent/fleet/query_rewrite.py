"""Point a SELECT's dataset tables straight at their files, using DuckDB's own parser.

DuckDB parses the statement into its JSON syntax tree (json_serialize_sql), each reference to a
dataset table (a BASE_TABLE node with no schema, not shadowed by a CTE) is swapped for the
table's read_parquet subquery, and json_deserialize_sql turns the tree back into SQL. Parsing is
DuckDB's job, not ours: no regular expression decides what is a table reference. Statements the
serializer does not handle (it only knows SELECT) return None and go the view route instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_]*)')


def referenced_names(sql: str, known: list[str] | None = None) -> set[str]:
    """Every word of the statement that could name a table (lower case), optionally only the
    known ones. Over-inclusion costs a view, never a wrong answer."""
    words = {(quoted.replace('""', '"') if quoted else bare).lower()
             for quoted, bare in IDENTIFIER.findall(sql)}
    return words if known is None else {name for name in known if name.lower() in words}


def _tree(connection, sql: str) -> dict | None:
    text = connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
    tree = json.loads(text)
    return None if tree.get("error") else tree


def _cte_names(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for entry in (node.get("cte_map") or {}).get("map", []) or []:
            if isinstance(entry, dict) and "key" in entry:
                found.add(str(entry["key"]).lower())
        for value in node.values():
            _cte_names(value, found)
    elif isinstance(node, list):
        for value in node:
            _cte_names(value, found)
    return found


def _source_node(connection, source_sql: str, alias: str, column_aliases: list) -> dict:
    template = _tree(connection, f'SELECT * FROM {source_sql} AS "{alias.replace(chr(34), chr(34) * 2)}"')
    node = template["statements"][0]["node"]["from_table"]
    node["column_name_alias"] = column_aliases
    return node


def _swap(connection, node: Any, sources: dict[str, str], shadowed: set[str], swapped: list) -> Any:
    if isinstance(node, dict):
        name = str(node.get("table_name", "")).lower()
        if (node.get("type") == "BASE_TABLE" and not node.get("schema_name") and not node.get("catalog_name")
                and name in sources and name not in shadowed):
            swapped.append(name)
            return _source_node(connection, sources[name], node.get("alias") or node["table_name"],
                                node.get("column_name_alias", []))
        return {key: _swap(connection, value, sources, shadowed, swapped) for key, value in node.items()}
    if isinstance(node, list):
        return [_swap(connection, value, sources, shadowed, swapped) for value in node]
    return node


def rewrite_select(connection, sql: str, sources: dict[str, str]) -> str | None:
    """`sql` with dataset tables read from their files, the same text when it names none, or
    None when DuckDB's serializer cannot represent the statement (not a SELECT, or a syntax
    error, which then surfaces from DuckDB itself on the view route)."""
    try:
        tree = _tree(connection, sql)
    except Exception:  # noqa: BLE001 - any parser refusal means "use the view route"
        return None
    if tree is None:
        return None
    lowered = {name.lower(): source for name, source in sources.items()}
    swapped: list[str] = []
    tree = _swap(connection, tree, lowered, _cte_names(tree, set()), swapped)
    if not swapped:
        return sql
    return connection.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchone()[0]
