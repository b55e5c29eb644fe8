"""Child processes of the local cluster: each in its own process group, logged to a file,
stopped by PID (SIGTERM to the group, then SIGKILL) and recorded so another process can stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
from pydantic import BaseModel

from rembg_devcluster.errors import ComponentDiedError

LOG_TAIL_LINES = 30


class ProcessRecord(BaseModel):
    """Identifies a started process across CLI runs (PID plus start time: PIDs recycle)."""

    name: str
    pid: int
    create_time: float
    log: Path
    argv: list[str]

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children (0 once gone)."""
        if not self.alive():
            return 0
        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.NoSuchProcess:
            return 0


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Starts argv in a new session (its own process group), stdout+stderr appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0
    return popen, ProcessRecord(
        name=name, pid=popen.pid, create_time=create_time, log=log, argv=list(argv)
    )


def raise_if_dead(record: ProcessRecord, popen: subprocess.Popen[bytes] | None = None) -> None:
    """ComponentDiedError with the exit code and the tail of the log when the process is gone."""
    if popen is not None:
        code = popen.poll()
        if code is None:
            return
    elif record.alive():
        return
    else:
        code = None
    status = f"exit code {code}" if code is not None else "it is gone"
    raise ComponentDiedError(
        f"{record.name} died ({status}); last lines of {record.log}:\n{log_tail(record.log)}"
    )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        # Processes come and go while we iterate: either library may say "no such process".
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def _reap(popen: subprocess.Popen[bytes] | None) -> None:
    """Collects our child's exit status (else Popen warns that it is 'still running')."""
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)


def _gone(record: ProcessRecord) -> bool:
    return not record.alive() and not _group_members(record.pid)


def stop(
    record: ProcessRecord,
    popen: subprocess.Popen[bytes] | None = None,
    grace_seconds: float = 10.0,
) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period; reaps our own children."""
    if not record.alive():
        _reap(popen)
        return
    _signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and not _gone(record):
        if popen is not None:
            popen.poll()
        time.sleep(0.05)
    if not _gone(record):
        _signal_group(record.pid, signal.SIGKILL)
    _reap(popen)
    kill_deadline = time.monotonic() + 5
    while not _gone(record) and time.monotonic() < kill_deadline:
        time.sleep(0.05)


class ProcessHost:
    """Mixin for a cluster handle that also runs processes on top of it (operator, servers).

    Subclasses provide `records`, `log_dir`, `env` and `save()`; each spawned process logs to
    log_dir/<name>.log and is stopped by `stop_extras()` before the cluster itself goes down.
    """

    records: list[ProcessRecord]
    _popens: dict[str, subprocess.Popen[bytes]]

    @property
    def log_dir(self) -> Path:
        raise NotImplementedError

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def save(self) -> None:
        """Persists the records (a no-op where nothing outlives this Python process)."""

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ProcessRecord:
        """Starts a process tied to this cluster: logged under log_dir, stopped before the cluster.

        env defaults to self.env (KUBECONFIG and PATH set). A name may be reused once the
        previous process of that name is stopped (e.g. to restart the operator).
        """
        if any(p.name == name and p.alive() for p in self.records):
            raise ComponentDiedError(f"a process named {name!r} is already running")
        self.records = [p for p in self.records if p.name != name]
        popen, record = spawn(name, argv, self.log_dir / f"{name}.log", env or self.env, cwd)
        self._popens[name] = popen
        self.records.append(record)
        self.save()
        return record

    def process(self, name: str) -> ProcessRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no process named {name!r} was spawned here")

    def wait_process(self, name: str, timeout: float) -> int:
        """Waits for a process spawned here to exit and returns its exit code."""
        popen = self._popens.get(name)
        if popen is None:
            raise KeyError(f"{name!r} was not spawned by this Python process")
        return popen.wait(timeout=timeout)

    def stop_process(self, name: str, grace_seconds: float = 10.0) -> None:
        """Stops one process (SIGTERM to its group, SIGKILL after the grace period)."""
        stop(self.process(name), self._popens.get(name), grace_seconds=grace_seconds)

    def kill_process(self, name: str) -> None:
        """SIGKILLs one process group at once: a crash, e.g. the operator mid-reconcile."""
        self.stop_process(name, grace_seconds=0.0)

    def log_tail(self, name: str, lines: int = 60) -> str:
        return log_tail(self.log_dir / f"{name}.log", lines)

    def stop_extras(self, names_to_keep: Sequence[str] = (), grace_seconds: float = 10.0) -> None:
        """Stops every spawned process except names_to_keep, newest first."""
        for record in reversed(self.records):
            if record.name not in names_to_keep:
                stop(record, self._popens.get(record.name), grace_seconds=grace_seconds)
