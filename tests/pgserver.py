"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package,
``initdb`` into a temporary folder, started on a unix socket only (no TCP
port), stopped at the end. Run as root, the server runs as the ``postgres``
system user (PostgreSQL refuses to run as root); otherwise as the current user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "crossfind"  # the server's superuser (trust authentication on the socket)


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "pg_ctl").exists() else None


class PgServer:
    """One throwaway server; :meth:`new_database` gives a fresh database's URL."""

    def __init__(self, fsync: bool = False) -> None:
        """``fsync`` off (the default) for tests: faster, and nothing here must survive a power cut."""
        bindir = _bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no pg_ctl; apt-get install postgresql)")
        self.bin = bindir
        self.runas: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="crossfind-pg-"))
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server as") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.runas = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.socket = self.dir  # the socket file lies beside the data folder
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        opts = f"-c listen_addresses='' -c unix_socket_directories={self.socket} -c fsync={'on' if fsync else 'off'} -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
        self.running = True

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.runas, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            log = self.dir / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed: {proc.stderr.strip() or proc.stdout.strip()} {tail}".strip())

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@/{database}?host={self.socket}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(host=str(self.socket), user=USER, dbname="postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if getattr(self, "running", False):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)
