"""A throwaway PostgreSQL server for the sweep tests: ``initdb`` and ``pg_ctl`` in a temporary
folder, on a free port, password authentication over TCP. As root the server runs as the
unprivileged ``postgres`` user (PostgreSQL refuses to run as root).

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import system_packages

USER, PASSWORD, DATABASE = "sweep", "s3cret-pw", "sweeps"


def server_binaries() -> dict[str, str] | None:
    """``initdb``, ``pg_ctl`` and ``postgres`` (on PATH or in Debian's versioned folder)."""
    found = {}
    versioned = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        path = shutil.which(name) or next(
            (str(d / name) for d in versioned if (d / name).is_file()), None
        )
        if path is None:
            return None
        found[name] = path
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server with a database and a user with a password; yields its URL (password in
    it), stops the server and removes its folder on exit. The folder is a fresh one under the
    system's temporary folder: pytest's own are private to root, where ``postgres`` cannot go."""
    binaries = server_binaries()
    system_packages.require("postgresql", binaries is not None, "a real PostgreSQL server")
    assert binaries is not None
    folder = Path(tempfile.mkdtemp(prefix="sweep-postgres-"))
    data = folder / "data"
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    superuser = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, cwd=folder)
        assert done.returncode == 0, f"{command[0]}: {done.stdout}{done.stderr}"[-2000:]

    run(binaries["initdb"], "-D", str(data), "-U", superuser, "--auth-local=trust",
        "--auth-host=scram-sha-256")  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=100"
    run(binaries["pg_ctl"], "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
        "-w", "start")  # fmt: skip
    try:
        sql = f"CREATE USER {USER} PASSWORD '{PASSWORD}';CREATE DATABASE {DATABASE} OWNER {USER};"
        for statement in sql.split(";")[:-1]:
            run("psql", "-h", str(folder), "-p", str(port), "-U", superuser, "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-c", statement)  # fmt: skip
        yield f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"
    finally:
        run(binaries["pg_ctl"], "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
