"""Records of the runtime registry (registry.ExportRecord), as a serving process writes them."""

from __future__ import annotations

from fuse_disk_export import registry


def record(pid: int, mountpoint: str = "/images/a.qcow2", **kw: object) -> registry.ExportRecord:
    fields: dict[str, object] = dict(
        image=mountpoint,
        format="qcow2",
        virtual_size=1 << 30,
        mountpoint=mountpoint,
        writable=True,
        pid=pid,
        daemon_pid=pid + 1,
        since=1.0,
    )
    fields.update(kw)
    return registry.ExportRecord(**fields)  # type: ignore[arg-type]
