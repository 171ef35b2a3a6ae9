"""Where a study lives, and how a killed worker's trial is found and retried.

* Default: Optuna's journal file ``<out>/study.journal`` (an append-only log with a file lock:
  safe for several processes on one machine, unlike SQLite under concurrent writers).
* ``--storage URL`` with ``://`` (``postgresql://``, ``mysql://``, ``sqlite:///``): Optuna's
  RDB storage, for workers on many machines, with Optuna's heartbeat: a trial whose worker
  stopped beating for ``GRACE_S`` is failed and retried by ``RetryFailedTrialCallback``.
* Any other ``--storage`` value is a journal file path.

Journal storage has no heartbeat, so every trial records its worker (host, pid, process start
time). A rerun on the same host finds RUNNING trials whose worker process is gone (``kill -9``,
OOM killer, power loss), marks them FAIL and queues the same parameters again — the same thing
Optuna's ``RetryFailedTrialCallback`` does for stale RDB trials (that callback does the queueing
here too). A trial whose worker is on another host is left to that host.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from fastft.errors import ConfigError, UserError

HEARTBEAT_S = 30  # RDB heartbeat interval; a worker silent for GRACE_S is taken as dead
GRACE_S = 120
MAX_RETRY = 3  # an interrupted trial is retried this many times, then left failed
WORKER_ATTR = "fastft_worker"
REASON_ATTR = "fail_reason"


def is_url(storage: str | None) -> bool:
    return bool(storage) and "://" in storage


def check_storage_arg(storage: str | None) -> None:
    """Reject what cannot be a storage before anything is loaded or written."""
    if not is_url(storage):
        return
    scheme = storage.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql"):
        raise ConfigError(f"--storage {storage!r}: expected an Optuna RDB URL (sqlite:///, postgresql://, "
                          "mysql://) or a journal file path")


def retry_callback():
    """Optuna's callback that queues a dead trial's parameters again (renamed in Optuna 4.9;
    the old name still works there but warns)."""
    import warnings

    import optuna.storages as s

    cls = getattr(s, "RetryHeartbeatStaleTrialCallback", None) or s.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning: the interface is stable since 2.8
        return cls(max_retry=MAX_RETRY, inherit_intermediate_values=False)


def open_storage(storage: str | None, out: Path):
    """The Optuna storage object for ``--storage`` (None: the journal file in ``out``)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_url(storage):
        try:
            import inspect

            kw = ("heartbeat_stale_trial_callback"  # Optuna >= 4.9; failed_trial_callback before
                  if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                  else "failed_trial_callback")
            import warnings

            with warnings.catch_warnings():  # ExperimentalWarning: heartbeat_interval
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                  **{kw: retry_callback()})
        except Exception as e:  # sqlalchemy's errors: bad driver, host unreachable, ...
            raise UserError(f"--storage {storage!r}: {str(e).splitlines()[0][:200]}") from None
    path = Path(storage) if storage else out / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot) from /proc: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def _worker_alive(worker: str) -> bool | None:
    """True/False for a worker on this host, None for another host's (cannot tell)."""
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == "?" or _start_time(int(pid)) == start


def recover_interrupted(study, log) -> int:
    """Fail and requeue RUNNING trials whose worker died on this host (and, on RDB, stale
    heartbeats anywhere). Returns how many were requeued."""
    import optuna
    from optuna.trial import TrialState

    if isinstance(study._storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)  # runs RetryFailedTrialCallback on each
    n = 0
    cb = retry_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is None or _worker_alive(worker) is not False:
            continue
        # callers hold the AskLock (journal), so two workers do not recover the same trial; on
        # RDB a concurrent recovery makes one of the two updates fail, and that one backs off
        try:
            study._storage.set_trial_user_attr(t._trial_id, REASON_ATTR, "interrupted (worker process gone)")
            if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        cb(study, study._storage.get_trial(t._trial_id))
        log(f"trial {t.number} was interrupted (its process {worker.rsplit(':', 2)[1]} is gone): "
            f"failed, its parameters queued again")
        n += 1
    return n


def counted(trial) -> bool:
    """Does a trial count toward --trials? Finished ones and running/queued ones do; an
    interrupted one does not (its retry, a queued copy, stands in for it)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return not str(trial.user_attrs.get(REASON_ATTR, "")).startswith("interrupted")
    return True


class AskLock:
    """A lock around "count the trials, then create one", so several workers on one journal
    file never run more than --trials in total (flock on ``<journal>.ask.lock``). On RDB storage
    (many machines) there is no shared file: workers may overshoot by one trial each."""

    def __init__(self, storage: str | None, out: Path):
        self.path = None if is_url(storage) else Path(str(Path(storage) if storage else out / "study.journal")
                                                      + ".ask.lock")
        self._local = threading.Lock()
        self._fd = None

    def __enter__(self):
        self._local.acquire()
        if self.path is not None:
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._local.release()
