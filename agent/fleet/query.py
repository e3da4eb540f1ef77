"""`guardian-agent query`: embedded DuckDB with one view per dataset table.

A local ROOT is read by DuckDB's own Parquet reader (hive partitioning, union_by_name so runs
written by different agent versions with extra columns still line up). An s3:// ROOT is read
through pyarrow's S3 filesystem and handed to DuckDB as Arrow datasets: DuckDB's httpfs
extension is downloaded at run time, which a locked-down trading host cannot do.

`query` runs the user's SQL as root, so once the views exist the connection is locked down:
only SELECT statements (and EXPLAIN of one) run; DuckDB's file access is limited to the dataset
directory (enable_external_access=false with allowed_directories, DuckDB >= 1.1), extensions are
never installed or loaded, and lock_configuration=true stops the SQL from undoing any of it.
Without this, `read_csv('/etc/shadow')`, `COPY ... TO`, `ATTACH`, `EXPORT DATABASE` and `INSTALL`
all worked.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from core.errors import BadInput, WorkFailed

FORMATS = ("table", "csv", "json")
READ_ONLY_STATEMENTS = ("SELECT",)
EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN(\s+ANALYZE)?\b", re.IGNORECASE)
TABLE_DIR = re.compile(r"^table=([A-Za-z0-9_]+)$")
LANDED_RACE_ATTEMPTS = 3
# How a file deleted under a running scan surfaces through pyarrow (local, S3) inside DuckDB.
FILE_GONE = re.compile(r"Path does not exist|NoSuchKey|No such file or directory|\[errno 2\]", re.IGNORECASE)


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def local_tables(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    names = []
    for child in sorted(root.iterdir()):
        match = TABLE_DIR.match(child.name)
        # An explicit depth, not rglob: rglob does not follow the symlinks `compact` swaps in.
        if match and child.is_dir() and any(child.glob("*/*/*.parquet")):
            names.append(match.group(1))
    return names


def s3_filesystem(endpoint_url: str | None, region: str | None):
    from pyarrow import fs

    kwargs = {}
    if endpoint_url:
        scheme, _, rest = endpoint_url.partition("://")
        kwargs["endpoint_override"] = rest.rstrip("/")
        kwargs["scheme"] = scheme
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def local_source_sql(base: Path, name: str) -> str:
    """The read_parquet expression for one local dataset table (its partition keys as columns)."""
    pattern = str(base / f"table={name}" / "*" / "*" / "*.parquet")
    return (f'(SELECT * EXCLUDE ("table") FROM read_parquet({sql_string(pattern)}, '
            f"hive_partitioning = true, union_by_name = true))")


def new_connection():
    # DuckDB on use: 0.3 s to import here, paid only by `query` and the fleet reads.
    import duckdb

    connection = duckdb.connect(":memory:")
    # DuckDB draws a progress bar on stdout for long scans, which would corrupt csv/json output.
    connection.execute("SET enable_progress_bar = false")
    return connection


def open_dataset_connection(root: str, endpoint_url: str | None = None, region: str | None = None,
                            wanted: set[str] | None = None, catalog_uri: str | None = None):
    """A DuckDB connection with one view per table of the dataset at ROOT; returns (conn, names).

    `wanted` limits the views to the tables a query names: binding a view globs and reads the
    footer of every file of its table, the whole cost of `SELECT 1` on a large dataset. With a
    catalog, a table is its Iceberg snapshot plus the landed runs not compacted yet (iceberg.py).
    """
    connection = new_connection()
    if catalog_uri:
        from agent.fleet.iceberg import Landing, open_catalog, register_views

        landing = Landing(root, endpoint_url, region)
        names = register_views(connection, landing, open_catalog(catalog_uri, landing, writer=False), wanted)
        lock_down(connection, None)  # every file is read by pyarrow, not by DuckDB's file system
        return connection, names
    if "://" not in root:
        base = local_root(root)
        names = local_tables(base)
        for name in names:
            if wanted is None or name in wanted:
                connection.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {local_source_sql(base, name)}')
        lock_down(connection, base)
        return connection, names
    connection, names = _open_s3(connection, root, endpoint_url, region, wanted)
    lock_down(connection, None)  # the Arrow datasets are read by pyarrow, not by DuckDB's file system
    return connection, names


def lock_down(connection, readable_dir: Path | None) -> None:
    """After the views are made: no file outside the dataset, no extension, no setting changes."""
    allowed = [str(readable_dir.resolve()).rstrip("/") + "/"] if readable_dir is not None else []
    connection.execute(f"SET allowed_directories = [{', '.join(sql_string(d) for d in allowed)}]")
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions",
                    "allow_community_extensions", "allow_unsigned_extensions"):
        try:
            connection.execute(f"SET {setting} = false")
        except Exception as error:  # noqa: BLE001 - a setting this DuckDB lacks
            if "unrecognized configuration" not in str(error).lower():
                raise
    connection.execute("SET lock_configuration = true")


def check_read_only(sql: str) -> None:
    """Refuse anything but SELECT (DuckDB's own parser names each statement's type)."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise BadInput(f"query: {str(error).splitlines()[0]}") from None
    if not statements:
        raise BadInput("query: give an SQL statement")
    for statement in statements:
        kind = str(statement.type).rsplit(".", 1)[-1]
        if kind == "EXPLAIN":
            check_read_only(EXPLAIN_PREFIX.sub("", statement.query, count=1))
            continue
        if kind not in READ_ONLY_STATEMENTS:
            raise BadInput(f"query: only SELECT statements can run (read-only access to the dataset), not {kind}")


def local_root(root: str) -> Path:
    base = Path(root)
    if not base.exists():
        raise BadInput(f"--dataset {root}: no such directory")
    return base


def _open_s3(connection, root: str, endpoint_url: str | None, region: str | None, wanted: set[str] | None):
    import pyarrow as pa
    import pyarrow.dataset as ds
    from pyarrow import fs

    from agent.fleet.stores import split_s3_url

    bucket, prefix = split_s3_url(root)
    base = f"{bucket}/{prefix}" if prefix else bucket
    filesystem = s3_filesystem(endpoint_url, region)
    try:
        children = filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True))
    except OSError as error:
        raise BadInput(f"--dataset {root}: cannot list it ({str(error).splitlines()[0]})") from None
    partitioning = ds.partitioning(pa.schema([("date", pa.date32()), ("host", pa.string())]), flavor="hive")
    names = []
    for child in children:
        match = TABLE_DIR.match(child.base_name)
        if child.type != fs.FileType.Directory or not match:
            continue
        if wanted is not None and match.group(1) not in wanted:
            names.append(match.group(1))
            continue
        dataset = ds.dataset(child.path, filesystem=filesystem, format="parquet", partitioning=partitioning)
        fragments = list(dataset.get_fragments())
        if not fragments:
            continue
        # Unify every file's schema so a column added by a newer agent is not silently dropped.
        schema = pa.unify_schemas([fragment.physical_schema for fragment in fragments]
                                  + [partitioning.schema])
        dataset = ds.dataset(child.path, filesystem=filesystem, format="parquet", partitioning=partitioning,
                             schema=schema)
        name = match.group(1)
        connection.register(f"__arrow_{name}", dataset)
        connection.execute(f'CREATE VIEW "{name}" AS SELECT * FROM "__arrow_{name}"')
        names.append(name)
    return connection, sorted(names)


def run_query(root: str, sql: str, endpoint_url: str | None = None, region: str | None = None,
              catalog_uri: str | None = None):
    """Returns (column names, rows).

    A local SELECT is rewritten so each dataset table it names reads its files directly (see
    query_rewrite): DuckDB then plans it exactly as a hand-written read_parquet, with partition
    pruning on date and host; a view costs a second glob and footer read of every file at bind.
    Anything else (EXPLAIN, DESCRIBE, SUMMARIZE, S3 datasets) gets views for the tables it names.
    With a catalog, a landed file that a compactor deletes while the query reads it makes the
    query plan again from a fresh listing (its rows are then in the Iceberg snapshot).
    """
    check_read_only(sql)
    if not catalog_uri:
        return _run_once(root, sql, endpoint_url, region, None)
    for _ in range(LANDED_RACE_ATTEMPTS - 1):
        try:
            return _run_once(root, sql, endpoint_url, region, catalog_uri)
        except LandedFileGone:
            continue
    return _run_once(root, sql, endpoint_url, region, catalog_uri)


class LandedFileGone(WorkFailed):
    """A file listed for the query was compacted away before it was read."""


def _run_once(root: str, sql: str, endpoint_url: str | None, region: str | None, catalog_uri: str | None):
    import duckdb

    from agent.fleet.query_rewrite import referenced_names, rewrite_select

    connection, names = None, []
    try:
        if catalog_uri:
            connection, names = open_dataset_connection(root, endpoint_url, region, referenced_names(sql),
                                                        catalog_uri)
        elif "://" not in root:
            base = local_root(root)
            names = local_tables(base)
            connection = new_connection()
            rewritten = rewrite_select(connection, sql, {n: local_source_sql(base, n) for n in names})
            if rewritten is None:
                connection.close()
                connection, names = open_dataset_connection(root, wanted=referenced_names(sql, names))
            else:
                lock_down(connection, base)  # the rewritten files are read under the same lock
                sql = rewritten
        else:
            connection, names = open_dataset_connection(root, endpoint_url, region, referenced_names(sql))
        cursor = connection.execute(sql)
        if cursor.description is None:
            return [], []
        columns = [item[0] for item in cursor.description]
        return columns, cursor.fetchall()
    except FileNotFoundError as error:
        if not catalog_uri:
            raise
        raise LandedFileGone(f"query: a landed file was compacted away under the query "
                             f"({LANDED_RACE_ATTEMPTS} tries): {str(error).splitlines()[0]}") from None
    except duckdb.Error as error:
        message = str(error).splitlines()[0]
        if catalog_uri and FILE_GONE.search(str(error)):
            raise LandedFileGone(f"query: {message}") from None
        hint = f" (tables: {', '.join(names) or 'none yet'})" if "does not exist" in message else ""
        raise BadInput(f"query: {message}{hint}") from None
    finally:
        if connection is not None:
            connection.close()


def _plain(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def format_rows(columns: list[str], rows: list[tuple], output_format: str) -> str:
    if output_format == "json":
        return json.dumps([{c: _plain(v) for c, v in zip(columns, row)} for row in rows], indent=2, default=str)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _plain(v) for v in row])
        return buffer.getvalue().rstrip("\n")
    cells = [[("NULL" if v is None else str(_plain(v))) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
