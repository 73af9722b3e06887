"""Where a sweep's Optuna study lives: its storage URL, shown without the password, and opened
with heartbeats so that a dead worker's trial is taken over.

- The default is a SQLite file in the sweep folder (``sqlite:///<out>/study.db``): embedded,
  nothing to start, for the workers of one machine.
- ``--storage URL`` takes any database Optuna's ``RDBStorage`` supports (SQLAlchemy URLs).
  PostgreSQL is the one tested for workers on several machines; ``postgresql://`` without a
  driver means psycopg 3 (``postgresql+psycopg://``), the driver the ``sweep`` extra installs.
- A password in the URL is never printed, logged or stored: :func:`masked_url` replaces it with
  ``***``, and the error of a storage that cannot be reached names the masked URL on one line.
  Better still, leave it out of the URL: libpq reads ``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

__all__ = [
    "STUDY_FILE",
    "StorageError",
    "dashboard_command",
    "masked_url",
    "open_storage",
    "storage_failure",
    "storage_url",
]

STUDY_FILE = "study.db"
_PASSWORD = re.compile(r"(?P<head>://[^:/@]*:)(?P<password>[^@]*)(?P<tail>@)")


class StorageError(RuntimeError):
    """The storage cannot be reached or written (one line, the URL's password masked)."""


def storage_url(given: str | None, folder: Path) -> str:
    """The storage URL: ``given``, with ``postgresql://`` meaning psycopg 3, or the sweep
    folder's SQLite file."""
    if given is None:
        return f"sqlite:///{(Path(folder) / STUDY_FILE).resolve()}"
    if "://" not in given:
        raise ValueError(
            f"storage: got {masked_url(given)!r}; allowed: a database URL such as "
            "sqlite:///path/study.db or postgresql://user@host:5432/db"
        )
    scheme, rest = given.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return given


def masked_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url, count=1)


def _password(url: str) -> str | None:
    match = _PASSWORD.search(url)
    return match["password"] if match and match["password"] else None


def _scrub(text: str, url: str) -> str:
    """``text`` (a driver's message) on one line, without the URL's password."""
    line = " ".join(str(text).split())
    password = _password(url)
    if password:
        line = line.replace(password, "***")
    return line.replace(url, masked_url(url))


def dashboard_command(url: str) -> str:
    """The ``optuna-dashboard`` command for the storage, without its password (libpq reads it
    from ``PGPASSWORD`` or ``~/.pgpass``)."""
    shown = _PASSWORD.sub(lambda m: m["head"][:-1] + m["tail"], url, count=1)
    return f"optuna-dashboard {shown}"


def open_storage(url: str, heartbeat: int | None = None) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url``; with ``heartbeat`` (seconds), a trial
    whose worker stayed silent for three heartbeats is failed and queued again (Optuna's
    ``RetryHeartbeatStaleTrialCallback``, intermediate values inherited).

    A URL no driver understands is a ``ValueError``; a database that cannot be reached is a
    :class:`StorageError` naming the masked URL."""
    import warnings

    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and their retry callback are marked experimental (since Optuna 2.8/2.9).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers write one file: wait for a lock rather than fail at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    heartbeat_args: dict[str, Any] = {}
    if heartbeat is not None:
        heartbeat_args = {
            "heartbeat_interval": heartbeat,
            "grace_period": 3 * heartbeat,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                inherit_intermediate_values=True
            ),
        }
    try:
        for attempt in range(_CREATION_ATTEMPTS):
            try:
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, **heartbeat_args
                )
                break
            except sqlalchemy.exc.SQLAlchemyError as error:
                if attempt + 1 == _CREATION_ATTEMPTS or not _created_concurrently(error):
                    raise
                time.sleep(0.2 * (attempt + 1))
        if url.startswith("sqlite"):
            _immediate_transactions(storage.engine)
        return storage
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as error:
        raise ValueError(
            f"storage: got {masked_url(url)!r}, which no installed database driver takes "
            f"({_scrub(error, url)}); allowed: sqlite:///path/study.db or "
            "postgresql://user@host:5432/db"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        raise StorageError(
            f"storage: cannot use {masked_url(url)}: {_reason(error, url)}"
        ) from None


# Opening a new database creates Optuna's tables and stamps their version. Two processes that
# open it at once (a sweep's first worker and one joining it, or the dashboard) both try: the
# loser's CREATE TABLE or version INSERT fails. It opens again and finds what the winner made.
_CREATION_ATTEMPTS = 5


def _created_concurrently(error: Exception) -> bool:
    """Whether ``error`` is another process creating the same tables first."""
    import sqlalchemy.exc

    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)


def _immediate_transactions(engine: Any) -> None:
    """Every SQLite transaction starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe for
    serializable SQLite, the driver's own transaction handling off). SQLite has no
    ``SELECT ... FOR UPDATE``: without this, two workers could both read a trial as WAITING
    and both set it RUNNING; with it the read and the write of a claim are one locked step, for
    the threads of one sweep and for two sweeps on one folder alike (PostgreSQL locks the row)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_transactions_off(connection: Any, record: Any) -> None:
        connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners are not reused


def _reason(error: BaseException, url: str) -> str:
    """The driver's own message (``OperationalError`` wraps it), one line, no password."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return _scrub(text[0] if text else type(original).__name__, url)


def storage_failure(error: BaseException, url: str) -> StorageError:
    """A database error met mid-sweep (full disk, lost connection) as one line."""
    return StorageError(f"storage: {masked_url(url)} failed: {_reason(error, url)}")
