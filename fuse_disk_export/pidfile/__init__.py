"""``-p PATH``: our pid, in a file written once every export is live and removed once everything
is reverted, so that a script that waits for it to go knows the images are free.

- `lock`: the file itself, `PidFile`, locked as QEMU locks its own pid files, so that a second
  instance given the same path refuses (`check_free`, before it exports anything) instead of
  taking it from a live export.
- `watcher`: `remove_pid_file_when_gone`, a plain ``sh`` that removes the file after a SIGKILL,
  once qemu-storage-daemon and a ``--mount-fs`` driver have exited too.
"""

from fuse_disk_export.pidfile.lock import PidFile, check_free
from fuse_disk_export.pidfile.watcher import remove_pid_file_when_gone

__all__ = ["PidFile", "check_free", "remove_pid_file_when_gone"]
