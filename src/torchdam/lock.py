"""One live run per output folder: a lock file that a crash cannot leave stuck.

``FolderLock(out)`` holds ``out/.torchdam.lock``, which names the holder (``PID host``).
The lock itself is an exclusive ``flock`` on that file, which the kernel drops when the
holder dies however it dies, so a crashed run's lock is simply taken over by the next run.
Where the filesystem has no ``flock`` (some network mounts), the PID in the file decides:
a lock naming a live process on this host is respected, one naming a dead process is
taken over.

    >>> import tempfile
    >>> with FolderLock(tempfile.mkdtemp()) as lock:
    ...     lock.path.name
    '.torchdam.lock'
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from torchdam.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["LOCK_FILE", "FolderLock", "pid_alive"]

LOCK_FILE = ".torchdam.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """Exclusive use of ``folder`` by this process until :meth:`release` (or exit).

    :meth:`acquire` raises :class:`ConfigError` naming the folder and the holder's PID when
    another live run holds it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def _holder(self, fd: int) -> str:
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        return text or "unknown holder"

    def _refuse(self, holder: str) -> ConfigError:
        return ConfigError(f"{self.folder} is in use by another torchdam run (PID/host {holder}, lock "
                           f"{self.path}); wait for it to finish, or choose another --out")

    def acquire(self) -> FolderLock:
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(20):  # retried only while a finishing holder unlinks the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as err:
                raise ConfigError(f"{self.path}: cannot create the run's lock file ({err.strerror or err}); "
                                  "remove whatever is in its place, or choose another --out") from None
            try:
                if not self._lock(fd):
                    raise self._refuse(self._holder(fd))
                try:  # the file we locked must still be the one at the path
                    same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{me}\n".encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise self._refuse("changing hands too fast")

    def _lock(self, fd: int) -> bool:
        """Take the lock on ``fd``; False when a live process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock here: trust the PID written in the file
        fields = self._holder(fd).split()
        pid = int(fields[0]) if fields and fields[0].isdigit() else 0
        if len(fields) >= 2 and fields[1] != socket.gethostname():
            return False  # another machine's run: whether it lives cannot be told from here
        return pid != os.getpid() and not pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file and drop the lock (safe to call twice)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # the lock is dropped below anyway; the next run takes the file over
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
