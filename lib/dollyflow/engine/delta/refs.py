"""Table references: a logical table name resolved to a Unity Catalog name or a path.

Table names come from config only and must be plain identifiers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dollyflow.config import TablesConfig, check_identifier, require_warehouse


@dataclass(frozen=True)
class TableRef:
    name: str                 # logical name, e.g. "bronze"
    path: str | None = None   # path-based table
    fqn: str | None = None    # catalog.schema.table

    @property
    def location(self) -> str:
        return self.fqn or self.path or ""


def schema_location(tables: TablesConfig) -> str | None:
    """The folder of the path-based tables (``<warehouse>/<schema>``); None for Unity Catalog tables
    (``tables.catalog`` set) or when no warehouse is set (the first table access says so)."""
    if tables.catalog or not tables.warehouse:
        return None
    wh = tables.warehouse if "://" in tables.warehouse else os.path.abspath(tables.warehouse)
    return f"{wh.rstrip('/')}/{check_identifier(tables.schema, 'tables.schema')}"


def resolve(tables: TablesConfig, name: str) -> TableRef:
    check_identifier(name, "table name")
    if tables.catalog:
        return TableRef(name, fqn=f"{check_identifier(tables.catalog, 'tables.catalog')}."
                                  f"{check_identifier(tables.schema, 'tables.schema')}.{name}")
    wh = require_warehouse(tables.warehouse)
    if "://" not in wh:
        wh = os.path.abspath(wh)
    return TableRef(name, path=f"{wh.rstrip('/')}/{check_identifier(tables.schema, 'tables.schema')}/{name}")
