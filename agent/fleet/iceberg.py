"""The fleet dataset as Apache Iceberg tables: `compact --catalog` and `query --catalog`.

Hosts keep landing one Parquet file per table × run in the Hive layout (`collect` is unchanged).
`compact --catalog URI` moves every landed partition older than --older-than into one Iceberg
table per dataset table (identity partitions on `date` and `host`, the columns Iceberg needs in
the rows), one catalog commit per batch of partitions. Spark, Trino and pyiceberg read the
tables through the same SQL catalog (Athena through Glue: docs/fleet.md); `query --catalog`
reads them plus what has not been compacted yet.

Atomic on S3, which has no multi-object rename, because the only switch is the catalog's
compare-and-swap of the table's metadata pointer (one row of the SQL catalog):
  1. the batch's landed keys are written to a ledger object (ROOT/_iceberg/_guardian_ledger/T/<uuid>.json);
  2. new data files are written (invisible: no snapshot references them yet);
  3. ONE commit replaces the batch's partitions (their old Iceberg rows are read and rewritten
     with the landed rows) and names the ledger in the snapshot summary (`guardian.ledger`);
  4. the landed objects are deleted, then the ledger.
A reader that lists the landing area skips keys named by a ledger that a committed snapshot
references, so between 3 and 4 nothing is counted twice. A crash before 3 leaves unreferenced
data files and a ledger no snapshot names (ignored: no rows missing, none doubled); a crash
after 3 is finished by the next `compact`, which deletes the keys of committed ledgers without
reading them again. A concurrent compactor's commit makes ours fail the catalog's check; the
batch is then planned again from a fresh listing, a bounded number of times.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs

from agent.fleet import compact as local_compact  # kill_point looked up at call time (tests patch it)
from agent.fleet.compact import CompactReport, sorted_rows
from agent.fleet.query import TABLE_DIR, s3_filesystem
from agent.fleet.stores import S3Store, split_s3_url
from core.errors import BadInput, WorkFailed

# pyiceberg and sqlalchemy are imported where they are used: `compact`/`query` load this module
# to check a --catalog URI before anything else, and pyiceberg's import costs more than the check.

NAMESPACE = "guardian"
WAREHOUSE_DIR = "_iceberg"
LEDGER_DIR = f"{WAREHOUSE_DIR}/_guardian_ledger"  # beside the tables' own directories, never in one
LEDGER_PROPERTY = "guardian.ledger"
CATALOG_SCHEMES = ("sqlite", "postgresql")
COMMIT_ATTEMPTS = 5
READ_THREADS = 16  # landed files read at once: small objects, latency-bound
# Landed Parquet (compressed) read into one commit: bounds memory (Arrow holds several times
# this: decoded, merged with the partitions' old rows, sorted) under the compact unit's
# MemoryMax=2G, while keeping the snapshot count, and so the table's metadata, small.
BATCH_BYTES = 32 * 1024 * 1024
TABLE_PROPERTIES = {
    "write.parquet.compression-codec": "zstd",
    "write.parquet.row-group-limit": str(128 * 1024),
    "guardian.layout": "landed Hive run files compacted by guardian-agent",
    # pyiceberg would rebase a failed commit onto the other writer's; ours is planned from a
    # listing and old rows that the other writer changed, so compact_table plans it again.
    "commit.retry.num-retries": "0",
}


# -- the dataset root through a pyarrow file system (S3 or local) -------------------------------

class Landing:
    """ROOT as a pyarrow file system: landed run files, ledgers and the Iceberg warehouse."""

    def __init__(self, root: str, endpoint_url: str | None = None, region: str | None = None):
        self.root = root
        if "://" in root:
            bucket, prefix = split_s3_url(root)
            self.base = f"{bucket}/{prefix}" if prefix else bucket
            self.filesystem = s3_filesystem(endpoint_url, region)
            self.scheme = "s3://"
        else:
            if not os.path.isdir(root):
                raise BadInput(f"--dataset {root}: no such directory")
            self.base = os.path.abspath(root)
            self.filesystem = fs.LocalFileSystem()
            self.scheme = "file://"
        self.endpoint_url, self.region = endpoint_url, region
        self._s3_store = None

    def path(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def uri(self, relative: str) -> str:
        return f"{self.scheme}{self.path(relative)}"

    def strip(self, uri: str) -> str:
        """A warehouse file URI (s3://b/k, file:///p or /p) as a path of this file system."""
        return uri.split("://", 1)[1] if "://" in uri else uri

    def files(self, relative_dir: str) -> list:
        selector = fs.FileSelector(self.path(relative_dir), recursive=True, allow_not_found=True)
        try:
            return [info for info in self.filesystem.get_file_info(selector) if info.type == fs.FileType.File]
        except OSError as error:
            raise BadInput(f"--dataset {self.root}: cannot list it ({str(error).splitlines()[0]})") from None

    def table_names(self) -> list[str]:
        try:
            children = self.filesystem.get_file_info(fs.FileSelector(self.base, allow_not_found=True))
        except OSError as error:
            raise BadInput(f"--dataset {self.root}: cannot list it ({str(error).splitlines()[0]})") from None
        names = [TABLE_DIR.match(c.base_name) for c in children if c.type == fs.FileType.Directory]
        return sorted(match.group(1) for match in names if match)

    def landed(self, table: str) -> dict[tuple[str, str], list]:
        """Landed run files of one table by (date, host): FileInfo with .path and .size."""
        found: dict[tuple[str, str], list] = {}
        prefix = self.path(f"table={table}") + "/"
        for info in self.files(f"table={table}"):
            parts = info.path[len(prefix):].split("/")
            if (len(parts) == 3 and parts[0].startswith("date=") and parts[1].startswith("host=")
                    and parts[2].endswith(".parquet")):
                found.setdefault((parts[0][5:], parts[1][5:]), []).append(info)
        return found

    def relative(self, path: str) -> str:
        return path[len(self.base) + 1:]

    def write_json(self, relative: str, document: dict) -> None:
        if self.scheme == "file://":  # on S3 it would only add empty "directory" marker objects
            self.filesystem.create_dir(self.path(relative).rsplit("/", 1)[0], recursive=True)
        with self.filesystem.open_output_stream(self.path(relative)) as stream:
            stream.write(json.dumps(document).encode())

    def read_json(self, relative: str) -> dict:
        with self.filesystem.open_input_stream(self.path(relative)) as stream:
            return json.loads(stream.read())

    def delete(self, relatives: list[str]) -> None:
        """Delete objects; ones already gone (a crashed run, another compactor) are fine."""
        if self.scheme == "s3://":
            self._delete_s3(relatives)
            return
        for relative in relatives:
            try:
                self.filesystem.delete_file(self.path(relative))
            except FileNotFoundError:
                pass

    def _delete_s3(self, relatives: list[str]) -> None:
        # boto3's batch delete, not pyarrow's: 1,000 keys a request, and pyarrow puts back an
        # empty "directory" marker object for every partition it empties.
        if self._s3_store is None:  # a boto3 client costs ~0.25 s to make: one per Landing
            self._s3_store = S3Store(self.root, endpoint_url=self.endpoint_url, region=self.region)
        failed = self._s3_store.delete_keys(relatives)
        if failed:
            raise WorkFailed(f"compact: {self.root}: could not delete {len(failed)} object(s) "
                             f"({failed[0].get('Code')}: {failed[0].get('Key')})")


# -- the catalog ---------------------------------------------------------------------------------

def redacted(uri: str) -> str:
    """The URI without its password: catalog URIs of a fleet's PostgreSQL carry one."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: show only the scheme
        return uri.split(":", 1)[0] + ":…"


def sqlite_path(uri: str) -> str:
    """sqlite:////abs/c.db -> /abs/c.db; sqlite:///rel.db -> rel.db (SQLAlchemy's convention)."""
    return uri.split(":///", 1)[1] if ":///" in uri else ""


def check_catalog_uri(uri: str, fail) -> None:
    """Syntax only (config parsing): a SQLAlchemy URI of a catalog database we support."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if "://" not in uri or scheme not in CATALOG_SCHEMES:
        fail(f"expected a sqlite:////path/catalog.db or postgresql://host/db URI, got {redacted(uri)!r}")
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if not path.startswith("/") or path == "/":
            fail(f"sqlite catalog needs an absolute path (sqlite:////var/lib/guardian-agent/catalog.db), "
                 f"got {redacted(uri)!r}")


def open_catalog(uri: str, landing: Landing, writer: bool = True):
    """The SQL catalog, its warehouse under ROOT/_iceberg; one line and exit 2 when unusable.
    A reader (`query`) does not create the namespace: it writes nothing to the catalog."""
    def fail(message):
        raise BadInput(f"--catalog: {message}")

    check_catalog_uri(uri, fail)
    if uri.startswith("sqlite"):
        directory = os.path.dirname(sqlite_path(uri))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            fail(f"{redacted(uri)}: directory {directory} does not exist or is not writable")
    try:
        from pyiceberg.catalog.sql import SqlCatalog
    except ModuleNotFoundError:
        fail("pyiceberg is not installed (pip install 'guardian-agent[iceberg]'; make setup does)")
    properties = {"uri": uri, "warehouse": landing.uri(WAREHOUSE_DIR)}
    if landing.endpoint_url:
        properties["s3.endpoint"] = landing.endpoint_url
    if landing.region or os.environ.get("AWS_DEFAULT_REGION"):
        properties["s3.region"] = landing.region or os.environ["AWS_DEFAULT_REGION"]
    try:
        catalog = SqlCatalog("guardian", **properties)
        if writer:
            catalog.create_namespace_if_not_exists(NAMESPACE)
    except ModuleNotFoundError as error:
        fail(f"{redacted(uri)}: the database driver {error.name!r} is not installed")
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's many connection errors
        fail(f"{redacted(uri)}: cannot open the catalog ({type(error).__name__}: "
             f"{str(error).splitlines()[0][:200]})")
    return catalog


def load_table(catalog, landing: Landing, name: str):
    """The dataset table's Iceberg table, or None; refuses a table of another dataset."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = catalog.load_table((NAMESPACE, name))
    except NoSuchTableError:
        return None
    expected = landing.uri(f"{WAREHOUSE_DIR}/{name}")
    if table.location().rstrip("/") != expected:
        raise BadInput(f"--catalog: table {NAMESPACE}.{name} is at {table.location()}, not in the dataset "
                       f"{landing.root} (one catalog database per dataset)")
    return table


# -- rows: what Iceberg can hold -----------------------------------------------------------------

def iceberg_ready(table: pa.Table) -> pa.Table:
    """Every column optional (a run may lack a column another has), timestamps in microseconds
    (Iceberg v2 has no other unit: nanoseconds are truncated), dictionaries decoded."""
    fields, columns = [], []
    for column, item in zip(table.columns, table.schema):
        kind = item.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_timestamp(kind) and kind.unit != "us":
            kind = pa.timestamp("us", tz=kind.tz)
        columns.append(pc.cast(column, kind, safe=False) if kind != item.type else column)
        fields.append(pa.field(item.name, kind, nullable=True))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def with_partition_columns(table: pa.Table, day: str, host: str) -> pa.Table:
    table = table.append_column(pa.field("date", pa.date32()),
                                pa.array([date.fromisoformat(day)] * table.num_rows, pa.date32()))
    return table.append_column(pa.field("host", pa.string()), pa.array([host] * table.num_rows, pa.string()))


def read_landed(landing: Landing, batch: "Batch") -> pa.Table:
    """Every landed file of the batch, with its partition columns; read in parallel, since on
    S3 each small file is a request's latency (pyarrow releases the GIL while it waits)."""
    def read(item: tuple[tuple[str, str], object]) -> pa.Table:
        (day, host), info = item
        with landing.filesystem.open_input_file(info.path) as handle:
            return with_partition_columns(iceberg_ready(pq.read_table(handle)), day, host)

    items = [(partition, info) for partition in batch.partitions for info in batch.infos[partition]]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        parts = list(pool.map(read, items))
    return pa.concat_tables(parts, promote_options="permissive")


# -- ledgers -------------------------------------------------------------------------------------

def committed_ledgers(table, landing: Landing, name: str) -> list[str]:
    """Ledgers still present (keys maybe not all deleted) that a snapshot of `table` names."""
    if table is None:
        return []
    named = {snapshot.summary.additional_properties.get(LEDGER_PROPERTY)
             for snapshot in table.snapshots() if snapshot.summary is not None}
    present = {landing.relative(info.path) for info in landing.files(f"{LEDGER_DIR}/{name}")}
    return sorted(present & named)


def committed_keys(table, landing: Landing, name: str) -> tuple[set[str], list[str]]:
    """Landed keys already in a committed snapshot (to skip), and the ledgers that named them."""
    ledgers = committed_ledgers(table, landing, name)
    keys: set[str] = set()
    for ledger in ledgers:
        keys.update(landing.read_json(ledger)["keys"])
    return keys, ledgers


def finish_ledgers(landing: Landing, ledgers: list[str]) -> None:
    """Step 4: the committed keys go, then the ledger that protects readers from them."""
    for ledger in ledgers:
        landing.delete(landing.read_json(ledger)["keys"])
        landing.delete([ledger])


# -- compaction ----------------------------------------------------------------------------------

@dataclass
class Batch:
    partitions: list[tuple[str, str]] = field(default_factory=list)
    infos: dict[tuple[str, str], list] = field(default_factory=dict)
    size_bytes: int = 0


def batches(landed: dict[tuple[str, str], list], cutoff: date, skip: set[str], landing: Landing) -> list[Batch]:
    found, current = [], Batch()
    for (day, host), infos in sorted(landed.items()):
        try:
            if date.fromisoformat(day) > cutoff:
                continue
        except ValueError:
            continue  # not a date partition: left in the landing area
        infos = [info for info in infos if landing.relative(info.path) not in skip]
        if not infos:
            continue
        current.partitions.append((day, host))
        current.infos[(day, host)] = infos
        current.size_bytes += sum(info.size or 0 for info in infos)
        if current.size_bytes >= BATCH_BYTES:
            found.append(current)
            current = Batch()
    if current.partitions:
        found.append(current)
    return found


def partition_filter(partitions: list[tuple[str, str]]):
    from pyiceberg.expressions import And, EqualTo, Or

    terms = [And(EqualTo("date", day), EqualTo("host", host)) for day, host in partitions]
    return terms[0] if len(terms) == 1 else Or(*terms)


def ensure_table(catalog, landing: Landing, name: str, schema: pa.Schema):
    table = load_table(catalog, landing, name)
    if table is not None:
        return table
    from pyiceberg.exceptions import TableAlreadyExistsError

    try:
        with catalog.create_table_transaction((NAMESPACE, name), schema=schema,
                                              location=landing.uri(f"{WAREHOUSE_DIR}/{name}"),
                                              properties=TABLE_PROPERTIES) as create:
            with create.update_spec() as spec:
                spec.add_identity("date")
                spec.add_identity("host")
    except TableAlreadyExistsError:
        pass  # another compactor created it first
    return load_table(catalog, landing, name)


def commit_batch(catalog, landing: Landing, name: str, batch: Batch, table, report) -> None:
    """Steps 1-4 for one batch, committed on top of `table` exactly as it was when the ledgers
    and the landing area were listed: a commit by anyone since makes ours fail, never double."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException


    keys = [landing.relative(info.path) for p in batch.partitions for info in batch.infos[p]]
    landed = read_landed(landing, batch)
    if table is None:
        table = ensure_table(catalog, landing, name, landed.schema)
        if table.current_snapshot() is not None:  # another compactor created it and committed
            raise CommitFailedException(f"table {name} was created and written concurrently")
    row_filter = partition_filter(batch.partitions)
    scan = table.scan(row_filter=row_filter)
    existing_files = len(list(scan.plan_files()))  # rewritten with the landed rows: one file each
    existing = scan.to_arrow()
    merged = pa.concat_tables([existing, landed], promote_options="permissive") if existing.num_rows else landed
    merged = sorted_rows(merged, leading=("date", "host"))
    ledger = f"{LEDGER_DIR}/{name}/{uuid.uuid4().hex}.json"
    landing.write_json(ledger, {"table": name, "keys": keys})  # 1
    transaction = table.transaction()
    with transaction.update_schema() as update:
        update.union_by_name(merged.schema)  # a newer agent's extra column: schema evolution
    with warnings.catch_warnings():  # "Delete operation did not match any records": a new partition
        warnings.simplefilter("ignore", UserWarning)
        transaction.overwrite(merged, overwrite_filter=row_filter,  # 2 (data files written now)
                              snapshot_properties={LEDGER_PROPERTY: ledger, "guardian.landed-files": str(len(keys))})
    local_compact.kill_point("iceberg-before-commit")
    try:
        committed = transaction.commit_transaction()  # 3: the one atomic switch
    except (CommitFailedException, ValidationException):  # both: the commit did not land
        landing.delete([ledger])  # ours, never committed: nobody reads it
        raise
    local_compact.kill_point("iceberg-after-commit")
    landing.delete(keys)  # 4: the committed keys go, then the ledger that hid them from readers
    landing.delete([ledger])
    summary = committed.current_snapshot().summary.additional_properties
    report.partitions += len(batch.partitions)
    report.files_before += len(keys) + existing_files
    report.files_after += int(summary.get("added-data-files", 0) or 0)
    report.rows += landed.num_rows


def compact_table(catalog, landing: Landing, name: str, cutoff: date, report) -> None:
    """Batch after batch, each planned in this order: load the table, finish the ledgers its
    snapshots name (a crash, or another compactor, between commit and delete), list the landing
    area without the keys they hold, commit on top of the table as loaded."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    lost = 0
    while lost < COMMIT_ATTEMPTS:
        table = load_table(catalog, landing, name)
        skip, ledgers = committed_keys(table, landing, name)
        if ledgers:
            finish_ledgers(landing, ledgers)
            report.recovered += len(ledgers)
        plan = batches(landing.landed(name), cutoff, skip, landing)
        if not plan:
            return
        try:
            commit_batch(catalog, landing, name, plan[0], table, report)
        except (CommitFailedException, ValidationException, FileNotFoundError):
            lost += 1  # another compactor moved first: plan again from a fresh listing
    raise WorkFailed(f"compact: table {name}: lost {COMMIT_ATTEMPTS} commits to concurrent compactors; "
                     "run it again (everything committed so far is kept)")


def compact_to_iceberg(root: str, catalog_uri: str, older_than_days: float = 1.0, today: date | None = None,
                       endpoint_url: str | None = None, region: str | None = None):

    if not (older_than_days >= 0):
        raise BadInput("--older-than: must be a number of days ≥ 0")
    landing = Landing(root, endpoint_url, region)
    catalog = open_catalog(catalog_uri, landing)
    cutoff = (today or date.today()) - timedelta(days=int(older_than_days))
    report = CompactReport()
    for name in landing.table_names():
        try:
            compact_table(catalog, landing, name, cutoff, report)
        except OSError as error:
            raise WorkFailed(f"compact: table {name}: {str(error).splitlines()[0]}") from None
    return report


# -- reading: the Iceberg tables plus what has not been compacted yet ----------------------------

def _dataset(landing: Landing, paths: list[str], partition_base: str | None, schema: pa.Schema | None = None):
    """A pyarrow dataset over explicit files, every file's columns kept (schema evolution):
    `schema` when known (an Iceberg table's), else the union of the files' own."""

    partitioning = None
    if partition_base is not None:
        partitioning = ds.partitioning(pa.schema([("date", pa.date32()), ("host", pa.string())]), flavor="hive")
    options = {"filesystem": landing.filesystem, "format": "parquet", "partitioning": partitioning,
               "partition_base_dir": partition_base}
    if schema is not None:
        return ds.dataset(paths, schema=schema, **options)
    dataset = ds.dataset(paths, **options)
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    if partitioning is not None:
        schemas.append(partitioning.schema)
    return ds.dataset(paths, schema=pa.unify_schemas(schemas, promote_options="permissive"), **options)


def table_sources(landing: Landing, catalog, name: str) -> list:
    """The pyarrow datasets that together hold table `name` once, each row exactly once.

    Order matters: the landing area is listed BEFORE the table's snapshot is loaded, so a key
    compacted in between is either skipped (its ledger is still there) or already deleted (the
    read then fails, and run_query plans again) — never read from both places."""
    landed = landing.landed(name)
    table = load_table(catalog, landing, name)
    sources = []
    skip: set[str] = set()
    if table is not None and table.current_snapshot() is not None:
        skip, _ = committed_keys(table, landing, name)
        tasks = list(table.scan().plan_files())
        if any(task.delete_files for task in tasks):  # written by another engine: let pyiceberg merge
            sources.append(table.scan().to_arrow())
        elif tasks:
            # The table's schema, not each file's footer: one request less per file on S3.
            sources.append(_dataset(landing, [landing.strip(task.file.file_path) for task in tasks], None,
                                    table.schema().as_arrow()))
    paths = [info.path for infos in landed.values() for info in infos if landing.relative(info.path) not in skip]
    if paths:
        sources.append(_dataset(landing, paths, landing.path(f"table={name}")))
    return sources


def catalog_tables(catalog) -> list[str]:
    from pyiceberg.exceptions import NoSuchNamespaceError

    try:
        return [identifier[-1] for identifier in catalog.list_tables(NAMESPACE)]
    except NoSuchNamespaceError:
        return []  # nothing compacted into this catalog yet


def register_views(connection, landing: Landing, catalog, wanted: set[str] | None) -> list[str]:
    """One DuckDB view per table: its Iceberg rows UNION ALL BY NAME its landed rows."""
    names = sorted(set(landing.table_names()) | set(catalog_tables(catalog)))
    for name in names:
        if wanted is not None and name.lower() not in wanted:
            continue
        parts = []
        for index, source in enumerate(table_sources(landing, catalog, name)):
            connection.register(f"__{name}_{index}", source)
            parts.append(f'SELECT * FROM "__{name}_{index}"')
        if parts:
            connection.execute(f'CREATE VIEW "{name}" AS {" UNION ALL BY NAME ".join(parts)}')
    return names
