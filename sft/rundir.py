"""The run directory as a resource: one run at a time, nothing written until the run really starts.

- `RunLock`: `run.lock` (host, pid, process start time, Slurm job) held by rank 0 for the whole run. It is
  created complete (written aside, then hard-linked into place, which fails if the name exists, also on
  NFS) and kept under a POSIX `lockf` lock while the run lives. A lock whose holder is dead is taken over
  in place, under that `lockf` lock, so two starts can never both take the same stale lock. A holder on
  another host is only taken over when it was an earlier run of the same Slurm job (Slurm runs one
  instance of a job at a time, and a requeued job may land on another node); otherwise the start is
  refused, naming the holder, because its liveness cannot be checked from here.
- `check_writable` / `check_free_space`: read-only checks made before anything is written.
- `write_config`: config.yaml replaced atomically, plus configs/<step>.yaml, the history of every start
  (a resume names changed trajectory keys by reading the config a checkpoint was trained with).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from sft.errors import SFTError

LOCK_NAME = "run.lock"
GB = 2**30


def _proc_start(pid: int) -> int | None:
    """Start time of a process in clock ticks after boot (tells a live pid from a reused one)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode())
        return holder if isinstance(holder, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}  # written by nobody we know (a crash mid-takeover): treat as stale


def _stale(holder: dict) -> bool:
    """True if the holder is certainly gone (this host: its pid is dead or reused; or an earlier run of
    this same Slurm job). A holder on another host is presumed alive."""
    me = _me()
    if not holder.get("host") or not holder.get("pid"):
        return True
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] and holder["host"] != me["host"]:
        return True
    if holder["host"] != me["host"]:
        return False
    start = _proc_start(int(holder["pid"]))
    return start is None or (holder.get("start") is not None and start != holder["start"])


def _describe(holder: dict, path: Path) -> str:
    where = f"host {holder.get('host')} pid {holder.get('pid')}"
    if holder.get("slurm_job"):
        where += f" (Slurm job {holder['slurm_job']})"
    remote = holder.get("host") != socket.gethostname()
    hint = (f"if no run is using it any more (another machine: its process cannot be checked from here), delete {path}"
            if remote else "wait for it to finish, stop it, or choose another run.output_dir")
    return f"{path.parent}: another run is using this directory ({where}, since {holder.get('since', '?')}); {hint}"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None

    def refusal(self) -> str | None:
        """Read-only: why a start would be refused now (a live holder), or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{self.path}: cannot read the run lock ({exc.strerror})"
        try:
            holder = _read_holder(fd)
        finally:
            os.close(fd)
        return None if _stale(holder) else _describe(holder, self.path)

    def acquire(self) -> None:
        """Create the run directory and hold its lock until release(); SFTError names a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps(_me()).encode()
        deadline = time.monotonic() + 10
        while True:
            if self._create(me) or self._take_over_stale(me):
                return
            if time.monotonic() > deadline:  # the file keeps changing hands: someone else is starting here
                raise SFTError(self.refusal() or f"{self.path}: could not take the run lock; another start is under way")
            time.sleep(0.05)

    def _create(self, me: bytes) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}")
        tmp.write_bytes(me)
        try:
            os.link(tmp, self.path)  # atomic and exclusive, also over NFS; the lock appears complete
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create (complete a moment later)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            os.write(fd, me)
            os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR)
        # A concurrent start may hold lockf for a moment while it reads our (live) entry: wait it out.
        for _ in range(200):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                time.sleep(0.01)
        os.close(fd)
        raise SFTError(f"{self.path}: created but could not be locked; is another start running here?")

    def _take_over_stale(self, me: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False  # released meanwhile: try to create it again
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise SFTError(_describe(holder, self.path)) from None
        holder = _read_holder(fd)
        try:
            same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # released and recreated while we looked: start over
            os.close(fd)
            return False
        if not _stale(holder):
            os.close(fd)  # also drops our lockf
            raise SFTError(_describe(holder, self.path))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, me)
        os.fsync(fd)
        self.fd, self.took_over = fd, holder
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _read_holder(self.fd).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written (permissions, a read-only filesystem), writing nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SFTError(f"run.output_dir={run_dir}: exists and is not a directory")
    base = _existing_ancestor(run_dir)
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        raise SFTError(f"run.output_dir={run_dir}: {base} is on a read-only filesystem; choose a writable run.output_dir")
    targets = [base] + [p for p in (run_dir / "checkpoints",) if p.exists()]
    for target in targets:
        if not os.access(target, os.W_OK | os.X_OK):
            raise SFTError(f"run.output_dir={run_dir}: {target} is not writable by this user; choose a writable run.output_dir")


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(path)).free


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse if the filesystem of `path` cannot hold `need` more bytes (with 5% headroom)."""
    free = free_bytes(path)
    if free < need * 1.05:
        raise SFTError(f"{_existing_ancestor(path)}: not enough free disk space for {what} (needs about "
                       f"{fmt_bytes(need)}, {fmt_bytes(free)} free); free some space or choose another run.output_dir")


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_config(run_dir: Path, text: str, step: int) -> None:
    """config.yaml (replaced atomically) and configs/<step>.yaml, the config each start (re)began with."""
    history = run_dir / "configs"
    history.mkdir(parents=True, exist_ok=True)
    for target in (history / f"{step:06d}.yaml", run_dir / "config.yaml"):
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)


def config_at(run_dir: Path, step: int) -> Path | None:
    """The config a run was trained with at `step`: the newest configs/<k>.yaml with k <= step
    (config.yaml for runs from before the history existed)."""
    history = sorted((int(p.stem), p) for p in (run_dir / "configs").glob("*.yaml") if p.stem.isdigit())
    before = [p for k, p in history if k <= step]
    if before:
        return before[-1]
    return run_dir / "config.yaml" if (run_dir / "config.yaml").exists() and not history else None


# ---------------------------------------------------------------- directories a failed start must not leave

_created_by_this_start: list[Path] = []  # run directory and parents that did not exist when Hydra started


def _chain(path: Path) -> list[Path]:
    path = path.absolute()
    return [path, *path.parents]


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # hydra is a dependency; this only keeps the module importable without it
    _HydraCallback = object


class RunDirCallback(_HydraCallback):
    """Hydra creates its output directory (= run.output_dir) before the job starts. This runs just before:
    it refuses a run directory that cannot be written (one line, exit 2, instead of Hydra's traceback)
    and remembers which directories did not exist yet, so that a start that then fails removes them
    again (remove_created_dirs) and leaves no empty run directory behind."""

    def on_run_start(self, config, **kwargs) -> None:
        import sys

        from omegaconf import OmegaConf

        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        except Exception:  # noqa: BLE001 - an unresolvable dir is reported by the job itself
            return
        _created_by_this_start[:] = [p for p in _chain(run_dir) if not p.exists()]
        try:
            check_writable(run_dir)
        except SFTError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)


def remove_created_dirs() -> None:
    """After a failed start: remove the directories this start created, if they are still empty."""
    for path in _created_by_this_start:  # deepest first
        try:
            path.rmdir()
        except OSError:
            break
    _created_by_this_start.clear()


def keep_created_dirs() -> None:
    """The run started: what it created is its run directory now."""
    _created_by_this_start.clear()
