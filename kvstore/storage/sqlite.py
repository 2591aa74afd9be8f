"""SQLite storage engine: one WAL-mode file, a writer thread doing group commit, a reader thread.

Theory of operation
-------------------
Records live in ``kv(token, key, blob)``, a ``WITHOUT ROWID`` table whose primary key
``(token, key)`` is the clustered B-tree, so a ring-range scan is one index walk.  SQLite's
BINARY collation compares UTF-8 bytes, which orders text by code point exactly like Python
compares ``str``, so both engines agree on ``(token, key)`` order.  Meta blobs (see
``kvstore.storage.base``) live in a ``meta(name, blob)`` table of the same file and go through
the same writer queue, so they are durable and ordered exactly like record writes.

The event loop never calls SQLite (a commit with ``synchronous=FULL`` is an fsync: milliseconds).

* **Writes** go through one bounded in-process queue (a ``deque`` under a ``Condition``) to
  one *writer thread* that owns the only write connection.  The writer takes everything that
  is queued (at most ``max_batch``), applies it in one transaction, commits, and then settles
  the whole batch's futures with **one** ``call_soon_threadsafe`` per event loop.  A single
  FIFO queue and a single writer give per-store program order: a put then a delete of the
  same key, issued in that order, apply in that order.
* **Reads** run on one *reader thread* (a 1-worker executor) owning a read connection.  WAL
  lets it read concurrently with the writer, and since it runs every statement in autocommit
  mode (and always exhausts its cursors, so no read transaction stays open), it sees every
  commit that finished before the read was submitted: a ``get`` after an acknowledged
  ``put`` sees the put, whatever the fsync policy.
* **Reads on the loop.**  The thread hop of a read (submit, a concurrent future, the
  cross-thread wake-up) costs more CPU than the SQL, so two structures on the event loop answer
  without it when they can, and neither can answer older than the file or "absent" for a record
  that is in it:

  - a bounded LRU of committed blobs (``_WriteCache``), set only when a write *commits*; and
  - a membership filter (``kvstore.storage.keyfilter.KeyFilter``, a scalable Bloom filter) of
    every record that may be in the file: filled from a key scan when the store opens (in the
    writer thread, before any write is accepted) and updated when a ``put`` is *submitted*,
    before the writer can see it.  So every record in the file is in the filter, and a read the
    filter answers "certainly absent" for is answered ``None`` on the loop.  That is the
    node's read-before-write of a new key (every insert, the benchmark's whole PUT load).  A
    false positive, or a deleted record (a Bloom filter never forgets; the next open rebuilds it
    from the file), costs only the thread read it would have cost anyway.  Its memory is
    bounded by ``filter_bytes``; past that it stops growing and its false positive rate rises
    (towards "every read goes to the thread", the behaviour without a filter), never its answers.
    The Paxos store (acceptor states, also a ``SqliteStorage``) gets the same: an acceptor's
    ``load`` of a key never proposed is answered on the loop.  The cost is one key scan at open
    (about 1.2 us of CPU per record: 0.25-0.28 s for 200,000 records on a busy 2-core machine).

  Both rest on one assumption: **this object is the only writer of the file** (rows appear only
  through its writer).  A second writer (another store on the file, in this process or another)
  would make the cache serve overwritten blobs and the filter deny the other writer's records,
  so it is refused at open: the store holds an exclusive ``flock`` on ``<path>-owner`` until it is
  closed (``_lock_owner``).  Read-only readers of the file (``sqlite3`` in ``mode=ro``) are fine.  Point
  reads on the loop thread were the alternative considered: they would serve present records too,
  but a read on the loop can block it (a page not in the OS cache, a WAL lock held by a
  checkpoint: up to the busy timeout), which is why reads moved to a thread in the first place;
  the filter never touches the disk.  Meta blobs (``meta_get``, read at startup only) and scans
  always go to the reader thread.

Durability contract (what "``put`` returned" means), by ``fsync`` policy:

* ``always``: the writer starts a commit as soon as anything is queued; the commit runs with
  ``synchronous=FULL`` so the WAL is fsynced before the futures are settled.  Writes that
  queue up while a commit is running share the next commit (natural group commit); every
  one of them is still on stable storage before its ``put`` returns.
* ``batch``: like ``always``, but after the first write of a batch arrives the writer waits
  until ``batch_window_ms`` has passed since that arrival (or ``max_batch`` writes are
  queued, or the store closes) to gather more writes into the same fsync.  Under light load
  that buys fewer fsyncs for up to one window of extra latency; under heavy load (a commit
  slower than the window) no wait happens at all.
* ``never``: ``synchronous=OFF``.  Writes are still committed in batches, and ``put`` still
  returns only after the commit, so the write is visible to reads and survives the death of
  the *process* (it is in the OS page cache), but it is not fsynced: an OS crash or power
  loss may lose it, and may even lose the tail of the WAL.

Backpressure: at most ``max_pending`` writes may be submitted and not yet settled (queued or
in the commit in progress).  Past that, ``put``/``delete`` raise ``StorageBusy`` at once, never
waiting and never growing the queue; the node turns that into a 503.

Failure: if a commit fails (disk full, I/O error), the transaction is rolled back and every
write of that batch raises ``StorageError``; later batches are tried afresh.  A full disk
(``SQLITE_FULL``) raises the subclass ``StorageFull``: the write is certainly not applied.  Any
other error (a failed fsync) may have left the commit on disk, so it promises nothing.  If the writer
thread itself dies (a bug), the store stops accepting work and fails everything queued,
rather than leaving callers waiting forever.

Cancellation: a write is applied once it is queued, even if its awaiting task is cancelled.

Closing: ``close()`` stops intake, lets the writer commit everything already queued, closes
both connections and joins both threads.  Operations after ``close()`` raise
``StorageClosed`` (a ``StorageError``).  The constructor blocks while the threads open the
file (call it at startup, not on a hot path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

from kvstore.storage._common import (
    StorageBusy,
    StorageClosed,
    StorageFull,
    check_meta,
    check_record,
    scan_segments,
)
from kvstore.storage.base import FSYNC_POLICIES, FsyncPolicy, Record, StorageError
from kvstore.storage.keyfilter import KeyFilter

log = logging.getLogger(__name__)

T = TypeVar("T")

_PUT = 0
_DELETE = 1
_META_PUT = 2  # key = the meta name, token unused (0)
# (kind, token, key, blob or None, future to settle)
_Op = tuple[int, int, str, "bytes | None", "asyncio.Future[None]"]
# Why a batch failed: the error class each waiter gets, and the message.
_Failure = tuple[type[StorageError], str]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv ("
    " token INTEGER NOT NULL, key TEXT NOT NULL, blob BLOB NOT NULL,"
    " PRIMARY KEY (token, key)) WITHOUT ROWID"
)
# Meta blobs (the store's own facts, e.g. the node's incarnation) in the same file, so a lost or
# replaced file loses them too; a separate table keeps them out of every scan and count.
_META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, blob BLOB NOT NULL)"
_META_PUT_SQL = "INSERT INTO meta (name, blob) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET blob = excluded.blob"
_META_GET = "SELECT blob FROM meta WHERE name = ?"
_INSERT = "INSERT OR IGNORE INTO kv (token, key, blob) VALUES (?, ?, ?)"
_UPDATE = "UPDATE kv SET blob = ? WHERE token = ? AND key = ?"
_DELETE_SQL = "DELETE FROM kv WHERE token = ? AND key = ?"
_GET = "SELECT blob FROM kv WHERE token = ? AND key = ?"
# Row-value bounds let SQLite seek straight into the (token, key) primary key.
_SCAN_INCLUSIVE = (
    "SELECT token, key, blob FROM kv WHERE (token, key) >= (?, ?) AND token <= ? ORDER BY token, key LIMIT ?"
)
_SCAN_EXCLUSIVE = (
    "SELECT token, key, blob FROM kv WHERE (token, key) > (?, ?) AND token <= ? ORDER BY token, key LIMIT ?"
)

# SQLite waits this long for a lock held by another connection (e.g. a read-only reader process).
_BUSY_TIMEOUT_S = 5.0
# The file next to the database whose lock says which store owns it (see _lock_owner).
OWNER_LOCK_SUFFIX = "-owner"


def _lock_owner(path: str) -> int:
    """Take the exclusive lock that makes this store the file's only writer; its fd, held until close.

    The cache and the key filter answer reads from what *this* store wrote, so a second writer on
    the file (another store, in this process or another) would make them wrong: it is refused.
    A separate lock file, not the database: closing any descriptor of the database would drop the
    POSIX locks SQLite holds on it in this process.  ``flock`` is released by the kernel when the
    process dies, so a crashed owner never blocks the next start.
    """
    try:
        fd = os.open(path + OWNER_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise StorageError(f"cannot open {path}: another store (in this or another process) has it open") from None
        raise StorageError(f"cannot lock {path}{OWNER_LOCK_SUFFIX}: {exc}") from exc
    return fd


class _WriteCache:
    """A bounded LRU of the latest committed blob per record, kept on the event loop.

    Reads through the reader thread cost a thread hop each (more than the SQL itself); the
    node reads a key just before writing it (read-modify-write), so recently written records
    are the hot ones.  Entries are only ever set when a write *commits* (in commit order, on
    the loop), never from a read, so the cache can never hold a value older than the file's:
    a read that misses goes to SQLite as before.  ``None`` means "deleted".
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[int, str], bytes | None] = OrderedDict()

    def get(self, record: tuple[int, str]) -> tuple[bool, bytes | None]:
        if record in self.entries:
            self.entries.move_to_end(record)
            return True, self.entries[record]
        return False, None

    def set(self, record: tuple[int, str], blob: bytes | None) -> None:
        self.discard(record)
        self.entries[record] = blob
        self.bytes += len(blob) if blob is not None else 0
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= len(old) if old is not None else 0

    def discard(self, record: tuple[int, str]) -> None:
        old = self.entries.pop(record, None)
        self.bytes -= len(old) if old is not None else 0


def _settle_ops(cache: _WriteCache, ops: list[_Op], error: _Failure | None) -> None:
    """On the loop: record a batch's outcome in the cache (in commit order), then wake its writers."""
    for kind, token, key, blob, _fut in ops:
        if kind == _META_PUT:
            continue  # meta blobs are not records: never cached
        if error is None:
            cache.set((token, key), blob if kind == _PUT else None)
        else:
            cache.discard((token, key))  # unknown state: let the next read ask the file
    _settle([op[4] for op in ops], error)


def _settle(futures: list[asyncio.Future[None]], error: _Failure | None) -> None:
    """Resolve one batch's futures; runs on their event loop."""
    for fut in futures:
        if fut.done():  # the caller was cancelled; the write happened (or failed) regardless
            continue
        if error is None:
            fut.set_result(None)
        else:
            # One exception object per waiter: a shared one would accumulate every traceback.
            error_class, message = error
            fut.set_exception(error_class(message))


class SqliteStorage:
    """A durable ``Storage`` in one SQLite file; see the module docstring for the contract."""

    #: Upper bound on writes per transaction: bounds commit latency and the writer's lock hold.
    max_batch: int = 1024

    def __init__(
        self,
        path: str,
        fsync: FsyncPolicy,
        batch_window_ms: float = 2.0,
        max_pending: int = 10000,
        cache_entries: int = 65536,
        cache_bytes: int = 64 * 1024 * 1024,
        filter_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"unknown fsync policy {fsync!r}; expected one of {FSYNC_POLICIES}")
        if not path or path == ":memory:" or path.startswith("file:"):
            # Each connection would see its own private database: the reader would see nothing.
            raise ValueError(f"SqliteStorage needs a plain file path, got {path!r}")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.path = path
        self.fsync: FsyncPolicy = fsync
        self.durable = fsync != "never"  # without fsync a crash may lose acknowledged writes
        self.batch_window_ms = batch_window_ms
        self.max_pending = max_pending
        self._window_s = batch_window_ms / 1000.0 if fsync == "batch" else 0.0
        self._cache = _WriteCache(cache_entries, cache_bytes)
        self.filter_bytes = filter_bytes
        # Replaced by the writer thread with one filled from the file before the store is ready.
        self._filter = KeyFilter(max_bytes=filter_bytes, min_capacity=1)

        # --- shared with the writer thread, guarded by _cond --------------------------------
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Op] = deque()
        self._pending = 0  # submitted and not yet settled: queued plus the batch in commit
        self._wake_at = 1  # queue length at which a submitter must wake the writer
        self._first_at = 0.0  # monotonic arrival of the oldest queued write (batch window)
        self._stopping = False
        self._stop_reason = "storage is closed"

        # Written by the writer thread after each commit; a plain int read is atomic.
        self._count = 0
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None
        self._exited: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._rconn: sqlite3.Connection | None = None

        self._owner_fd = _lock_owner(path)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        name = os.path.basename(path)
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name=f"sqlite-writer:{name}", daemon=True
        )
        self._writer.start()
        try:
            ready.result()
        except Exception as exc:
            self._writer.join()
            os.close(self._owner_fd)
            raise StorageError(f"cannot open {path}: {exc}") from exc
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-reader:{name}")
        try:
            self._reader.submit(self._open_reader).result()
        except Exception as exc:
            self._reader.shutdown(wait=True)
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._writer.join()
            os.close(self._owner_fd)
            raise StorageError(f"cannot open {path} for reading: {exc}") from exc

    # --- public API (event loop side) ------------------------------------------------------

    async def get(self, key: str, token: int) -> bytes | None:
        check_record(key, token)
        record = (token, key)
        hit, blob = self._cache.get(record)
        if hit:
            self._check_open()
            return blob
        if not self._filter.may_contain(record):
            self._check_open()
            return None  # never put since the open, nor in the file at the open: not in the file
        return await self._read(self._get_sync, token, key)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        check_record(key, token, blob)
        await self._submit(_PUT, token, key, blob)

    async def delete(self, key: str, token: int) -> None:
        check_record(key, token)
        await self._submit(_DELETE, token, key, None)

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        assert isinstance(limit, int) and limit >= 0, f"limit must be a non-negative int: {limit!r}"
        segments = scan_segments(start_token, end_token, after)
        if limit == 0 or not segments:
            self._check_open()
            return []
        return await self._read(self._scan_sync, segments, limit)

    async def meta_get(self, name: str) -> bytes | None:
        check_meta(name)
        return await self._read(self._meta_get_sync, name)

    async def meta_put(self, name: str, blob: bytes) -> None:
        check_meta(name, blob)
        await self._submit(_META_PUT, 0, name, blob)

    async def count(self) -> int:
        self._check_open()
        return self._count

    async def size_bytes(self) -> int:
        self._check_open()
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # no WAL file right after a clean checkpoint
                total += os.stat(self.path + suffix).st_size
        return total

    async def close(self) -> None:
        if self._close_task is None:
            self._closed = True
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._close_task = asyncio.ensure_future(self._finish_close())
        await asyncio.shield(self._close_task)

    # --- event loop side helpers -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("storage is closed")

    def _submit(self, kind: int, token: int, key: str, blob: bytes | None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if kind == _PUT:
            # Before the writer can see the put; a put refused below only leaves a false positive.
            self._filter.add((token, key))
        with self._cond:
            if self._stopping:
                raise StorageClosed(self._stop_reason)
            if self._pending >= self.max_pending:
                raise StorageBusy(f"{self._pending} writes pending (max_pending={self.max_pending})")
            queue = self._queue
            if not queue:
                self._first_at = time.monotonic()
            queue.append((kind, token, key, blob, fut))
            self._pending += 1
            # The writer sleeps until there is work (idle) or a full batch (in a window):
            # waking it for anything less would only cost a context switch.
            if len(queue) >= self._wake_at:
                self._cond.notify()
        return fut

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._reader, fn, *args)
        except RuntimeError:  # executor shut down by a concurrent close()
            raise StorageClosed("storage is closed") from None
        return await fut

    async def _finish_close(self) -> None:
        await asyncio.wrap_future(self._exited)
        # The writer has settled its last batch and is returning: this join is immediate.
        self._writer.join()
        loop = asyncio.get_running_loop()
        # Queued behind any read still in flight, so those finish first.
        await loop.run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)  # the worker is idle now: returns at once
        os.close(self._owner_fd)  # both connections are closed: the next owner may open the file

    # --- reader thread -------------------------------------------------------------------

    def _open_reader(self) -> None:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
        )
        conn.execute("PRAGMA query_only = ON")
        self._rconn = conn

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _get_sync(self, token: int, key: str) -> bytes | None:
        conn = self._rconn
        if conn is None:
            raise StorageClosed("storage is closed")
        try:
            # fetchall, never fetchone: an unexhausted cursor keeps its read transaction (and
            # thus an old snapshot) open, and later reads would miss newer commits.
            rows = conn.execute(_GET, (token, key)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite read failed: {exc}") from exc
        return rows[0][0] if rows else None

    def _meta_get_sync(self, name: str) -> bytes | None:
        conn = self._rconn
        if conn is None:
            raise StorageClosed("storage is closed")
        try:
            rows = conn.execute(_META_GET, (name,)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite read failed: {exc}") from exc
        return rows[0][0] if rows else None

    def _scan_sync(self, segments: list[tuple[tuple[int, str], bool, int]], limit: int) -> list[Record]:
        conn = self._rconn
        if conn is None:
            raise StorageClosed("storage is closed")
        out: list[Record] = []
        try:
            for (lo_token, lo_key), inclusive, hi_token in segments:
                sql = _SCAN_INCLUSIVE if inclusive else _SCAN_EXCLUSIVE
                rows = conn.execute(sql, (lo_token, lo_key, hi_token, limit - len(out))).fetchall()
                out.extend(Record(t, k, b) for t, k, b in rows)
                if len(out) >= limit:
                    break
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite scan failed: {exc}") from exc
        return out

    # --- writer thread -------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
        )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"cannot enable WAL journal mode (got {mode!r})")
            # FULL in WAL mode fsyncs the WAL on every commit: that is the durability point.
            conn.execute("PRAGMA synchronous = OFF" if self.fsync == "never" else "PRAGMA synchronous = FULL")
            conn.execute(_SCHEMA)
            conn.execute(_META_SCHEMA)
            expected = int(conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])
            self._filter, self._count = self._scan_keys(conn, expected)
        except BaseException:
            conn.close()
            raise
        return conn

    def _scan_keys(self, conn: sqlite3.Connection, expected: int) -> tuple[KeyFilter, int]:
        """A filter of every record in the file, and their count; runs before any write is accepted."""
        key_filter = KeyFilter(expected, max_bytes=self.filter_bytes)
        cur = conn.execute("SELECT token, key FROM kv")
        count = 0
        while rows := cur.fetchmany(4096):  # bounded memory however large the file
            key_filter.fill(rows, len(rows))
            count += len(rows)
        return key_filter, count

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._open_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._write_loop(conn)
        except BaseException as exc:  # a bug: fail loudly, never leave callers waiting
            log.exception("sqlite writer thread for %s died", self.path)
            self._fail_queued(f"storage writer failed: {exc!r}")
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._exited.set_result(None)

    def _take_batch(self) -> list[_Op] | None:
        """Block until there is a batch to commit; None once stopping and fully drained."""
        cond = self._cond
        with cond:
            while not self._queue and not self._stopping:
                self._wake_at = 1
                cond.wait()
            if not self._queue:
                return None
            if self._window_s > 0:
                deadline = self._first_at + self._window_s
                self._wake_at = self.max_batch
                while len(self._queue) < self.max_batch and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                self._wake_at = 1
            queue = self._queue
            if len(queue) <= self.max_batch:
                # Swap rather than pop one by one: the event loop may be waiting on this lock.
                self._queue = deque()
                return list(queue)
            batch = [queue.popleft() for _ in range(self.max_batch)]
            self._first_at = time.monotonic()
            return batch

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        cur = conn.cursor()
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                error = self._apply(cur, batch)
            except BaseException as exc:
                # Stop intake *before* settling, so no caller sees its write fail and then
                # gets a later write queued to a writer that is gone.
                self._fail_queued(f"storage writer failed: {exc!r}", batch)
                raise
            with self._cond:
                self._pending -= len(batch)
            self._dispatch(batch, error)

    def _apply(self, cur: sqlite3.Cursor, batch: list[_Op]) -> _Failure | None:
        """Apply one batch in one transaction; why it failed if it was rolled back."""
        delta = 0
        try:
            cur.execute("BEGIN")
            for kind, token, key, blob, _ in batch:
                if kind == _META_PUT:
                    cur.execute(_META_PUT_SQL, (key, blob))
                elif kind == _PUT:
                    # INSERT OR IGNORE + UPDATE instead of an upsert: rowcount then tells a new
                    # record from a replaced one, which keeps count() exact without a scan.
                    cur.execute(_INSERT, (token, key, blob))
                    if cur.rowcount == 1:
                        delta += 1
                    else:
                        cur.execute(_UPDATE, (blob, token, key))
                else:
                    cur.execute(_DELETE_SQL, (token, key))
                    delta -= cur.rowcount
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            log.error("sqlite commit of %d writes to %s failed: %s", len(batch), self.path, exc)
            # SQLITE_FULL: a write() of the WAL met ENOSPC before the commit frame was complete, so
            # the transaction is not applied (SQLite rolls it back; recovery ignores a torn WAL tail).
            # Any other error (an fsync failure, say) may leave the commit on disk: unknown.
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                return StorageFull, f"disk full: sqlite write failed and was rolled back: {exc}"
            return StorageError, f"sqlite write failed: {exc}"
        self._count += delta
        return None

    def _dispatch(self, batch: list[_Op], error: _Failure | None) -> None:
        """Hand a settled batch back to its event loop(s): one thread hop per loop, not per write."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        last_loop: asyncio.AbstractEventLoop | None = None
        ops: list[_Op] = []
        for op in batch:
            loop = op[4].get_loop()
            if loop is not last_loop:
                ops = by_loop.setdefault(loop, [])
                last_loop = loop
            ops.append(op)
        for loop, loop_ops in by_loop.items():
            # A closed loop has nobody left waiting on these futures.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_ops, self._cache, loop_ops, error)

    def _fail_queued(self, reason: str, in_flight: list[_Op] | None = None) -> None:
        """Stop intake for good and fail every write not yet settled."""
        with self._cond:
            self._stopping = True
            self._stop_reason = reason
            batch = (in_flight or []) + list(self._queue)
            self._queue.clear()
            self._pending -= len(batch)
        self._dispatch(batch, (StorageError, reason))
