"""Hold an LLM host's Prefect concurrency slots so that a killed run cannot keep them; the host's
global concurrency limit itself (:func:`ensure_limit`) and where a data root records its holders.

Why not ``prefect.concurrency.sync.concurrency``: it keeps its lease id to itself, and a lease
outlives a SIGKILLed holder. Only a server's repossessor loop service revokes an expired lease,
temporary servers (``mmem`` without a server, the test harness) do not run it, and a server keeps
its leases in memory, so a restarted one forgets them while its database still counts their
slots. Either way the slots stay taken and every later run waits for them forever.

So a holder writes a record (limit, slots, lease id, which Prefect API) to a file in ``folder``
and keeps an exclusive ``flock`` on it while it lives; the kernel drops the lock when the process
dies, however it dies. A record whose lock can be taken is a dead run's. Before asking for slots,
and each time it is told to wait, a run frees the slots of dead runs' records:

- the server still knows the lease (renewing it works): release it by lease id;
- it does not, and cannot have revoked it itself (the dead run's server was a temporary one,
  which has no repossessor, or the lease had not expired yet, going by the record's mtime, the
  time its last renewal was sent): decrement the limit by the record's slots (never below 0);
- otherwise (a long-lived server, lease expired) its repossessor already gave the slots back, and
  decrementing again would free a live run's slots: only the record goes.

A live run's record is never read (its lock is held), so runs at once never free each other's
slots. The record is written before the slots are asked for and gets its lease id right after
the grant: a kill between the two (one local write) leaves slots no record can name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, get_current_settings

from tasks.runtime.context import logger

LEASE_S = 60.0  # the shortest lease a server grants; renewed every third of it
SKEW_S = 5.0  # margin for the clocks of this machine and a remote server
SUFFIX = ".slots"


@dataclass
class SlotRecord:
    limit: str
    slots: int
    pid: int
    api: str  # a digest of the API URL, or of the database a temporary server uses
    temporary: bool  # the run's server was a temporary one: nothing on it revokes a lease
    lease_s: float
    acquired_at: float
    lease_id: str | None = None


def current_api() -> tuple[str, bool]:
    """(digest naming the Prefect API this process talks to, whether it is a temporary server)."""
    url = PREFECT_API_URL.value()
    if url:
        return hashlib.sha256(url.encode()).hexdigest()[:16], False
    db = get_current_settings().server.database.connection_url
    db = db.get_secret_value() if db is not None else ""
    return hashlib.sha256(f"temporary:{db}".encode()).hexdigest()[:16], True


def _lease_gone(exc: PrefectHTTPStatusError) -> bool:
    return exc.response.status_code in (404, 410)


def _give_back(client, rec: SlotRecord, renewed_at: float) -> str:
    """Free a record's slots by the rules in the module docstring; returns what was done."""
    if rec.lease_id is None:
        return "never granted (or killed during the grant: nothing names them)"
    try:
        client.renew_concurrency_lease(uuid.UUID(rec.lease_id), lease_duration=rec.lease_s)
    except PrefectHTTPStatusError as exc:
        if not _lease_gone(exc):
            raise
    else:
        client.release_concurrency_slots_with_lease(uuid.UUID(rec.lease_id))
        return "released lease"
    if rec.temporary or time.time() < renewed_at + rec.lease_s - SKEW_S:
        client.release_concurrency_slots([rec.limit], rec.slots, max(renewed_at - rec.acquired_at, 1.0))
        return "decremented"
    return "revoked by the server"


def _read(fd: int) -> SlotRecord:
    text = os.pread(fd, 1 << 16, 0).decode()
    fields: dict = {}
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            fields.update(json.loads(line))
    return SlotRecord(**fields)


def _lock_dead(path: Path) -> int | None:
    """An fd holding ``path``'s lock if its writer is dead and the file is still there, else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not freed and unlinked by another run meanwhile
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def free_dead(folder: Path, client=None) -> int:
    """Free the slots of every dead run recorded in ``folder`` for this Prefect API; returns how many
    records."""
    paths = sorted(folder.glob("*" + SUFFIX)) if folder.is_dir() else []
    freed = 0
    api = current_api()[0]
    with contextlib.ExitStack() as stack:
        for path in paths:
            fd = _lock_dead(path)
            if fd is None:
                continue
            try:
                try:
                    rec = _read(fd)
                except (TypeError, ValueError):  # not a record (none is cut short: see hold_slots)
                    logger().warning("removing unreadable slot record %s", path.name)
                    path.unlink()
                    continue
                if rec.api != api:
                    continue  # another Prefect API's slots: freed when a run talks to that one
                if client is None:
                    client = stack.enter_context(get_client(sync_client=True))
                try:
                    what = _give_back(client, rec, os.fstat(fd).st_mtime)
                except Exception as exc:  # noqa: BLE001 - keep the record for the next run; this one goes on
                    logger().warning("could not give back the slots of dead run %d on %r: %s", rec.pid,
                                     rec.limit, exc)
                    continue
                path.unlink()
                freed += 1
                logger().warning("dead run %d, %d slots of %r: %s", rec.pid, rec.slots, rec.limit, what)
            finally:
                os.close(fd)
        for tmp in folder.glob("*.tmp") if folder.is_dir() else []:  # killed before its record was named
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > 60 and (fd := _lock_dead(tmp)) is not None:
                    tmp.unlink()
                    os.close(fd)
    return freed


def _renew(rec: SlotRecord, fd: int, stop: threading.Event) -> None:
    """Renew the lease until ``stop``; stamp the record's mtime with the time each renewal was sent."""
    with get_client(sync_client=True) as client:
        while not stop.wait(rec.lease_s / 3):
            sent = time.time()
            try:
                client.renew_concurrency_lease(uuid.UUID(rec.lease_id), lease_duration=rec.lease_s)
            except PrefectHTTPStatusError as exc:
                if _lease_gone(exc):
                    logger().error("the lease on %r is gone (server restarted?): the limit may be exceeded",
                                   rec.limit)
                    return
                logger().warning("renewing the lease on %r failed: %s", rec.limit, exc)
            except Exception as exc:  # noqa: BLE001 - transient: the next tick retries before the lease ends
                logger().warning("renewing the lease on %r failed: %s", rec.limit, exc)
            else:
                os.utime(fd, (sent, sent))


def _create_record(folder: Path, rec: SlotRecord) -> tuple[int, Path]:
    """The record file, locked, whole, and only then under a name that recovery reads."""
    folder.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    tmp, path = folder / (name + ".tmp"), folder / (name + SUFFIX)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, (json.dumps({k: v for k, v in asdict(rec).items() if k != "lease_id"}) + "\n").encode())
    os.rename(tmp, path)
    return fd, path


def _acquire(client, folder: Path, rec: SlotRecord) -> tuple[dict, float]:
    """Ask until granted, freeing dead runs' slots before each try; returns (response, time it was sent)."""
    while True:
        free_dead(folder, client)
        sent = time.time()
        try:
            res = client.increment_concurrency_slots_with_lease([rec.limit], rec.slots, "concurrency",
                                                                rec.lease_s)
            return res.json(), sent
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            time.sleep(float(exc.response.headers.get("Retry-After", 1)))


@contextlib.contextmanager
def hold_slots(folder: Path, limit: str, slots: int, lease_s: float = LEASE_S) -> Iterator[SlotRecord]:
    """Hold ``slots`` of the global concurrency limit ``limit`` (which must exist) for the block."""
    api, temporary = current_api()
    rec = SlotRecord(limit, slots, os.getpid(), api, temporary, lease_s, time.time())
    fd, path = _create_record(folder, rec)
    keep = False  # True while the slots may be held: a failed release leaves the record to recovery
    try:
        with get_client(sync_client=True) as client:
            granted, sent = _acquire(client, folder, rec)
            rec.lease_id = granted["lease_id"]
            keep = True
            os.write(fd, (json.dumps({"lease_id": rec.lease_id}) + "\n").encode())
            os.utime(fd, (sent, sent))
            stop = threading.Event()
            renewer = threading.Thread(target=_renew, args=(rec, fd, stop), daemon=True,
                                       name=f"renew-{limit}")
            try:
                if not granted["limits"]:
                    raise RuntimeError(f"no concurrency limit named {limit!r}: create it first")
                renewer.start()
                yield rec
            finally:
                stop.set()
                if renewer.is_alive():
                    renewer.join(timeout=5)
                _give_back(client, rec, os.fstat(fd).st_mtime)
                keep = False
    finally:
        if not keep:
            path.unlink(missing_ok=True)
        os.close(fd)


# --- the host's limit, and where a data root records its holders ----------------------------


def limit_name(host: str) -> str:
    """The Prefect global concurrency limit shared by every flow run that talks to ``host``."""
    return "ollama-" + "".join(c if c.isalnum() or c in ".-_" else "-" for c in host.split("://")[-1])


def ensure_limit(config, host: str | None = None) -> tuple[str, int]:
    """Create the limit of ``host`` (default ``config.host``) with ``config.concurrency`` slots if
    missing; returns (name, slots to hold), never more than the limit an operator may have set lower."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(host or config.host)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name,
                                                                                    limit=config.concurrency))
            except ObjectAlreadyExists:
                pass
            limit = client.read_global_concurrency_limit_by_name(name).limit
    if limit < 1:
        raise RuntimeError(f"the concurrency limit {name!r} has no slots; raise it in the Prefect UI")
    return name, min(limit, config.concurrency)


def slots_dir(config) -> Path:
    """Where runs on this data root (``config.cache_dir``) record the LLM hosts' slots they hold."""
    return config.cache_dir / "llm_slots"


def free_dead_slots(config) -> int:
    """Give back the concurrency slots that killed runs on this data root still hold."""
    return free_dead(slots_dir(config))
