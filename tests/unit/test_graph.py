"""The planner is pure: what it sends to QEMU is checked here without any process."""

from __future__ import annotations

import json

import pytest

from fuse_disk_export.engine.graph import (
    ImageSpec,
    Layer,
    Slice,
    Tuning,
    plan,
    single_queue_image,
)


def spec(path: str = "/img/a.qcow2", **kw: object) -> ImageSpec:
    args: dict[str, object] = {
        "image": path,
        "layers": (Layer(path, "qcow2"),),
        "mountpoint": path,
        "writable": True,
    }
    args.update(kw)
    return ImageSpec(**args)  # type: ignore[arg-type]


def names(graph_phase: tuple[object, ...]) -> list[str]:
    return [s.do.name for s in graph_phase]  # type: ignore[attr-defined]


def test_open_before_mount_on_the_same_path() -> None:
    graph = plan([spec()])
    opens, mounts = graph.phases
    assert names(opens) == ["blockdev-add", "blockdev-add"]
    assert names(mounts) == ["block-export-add"]
    file_node, fmt_node = (s.do.args for s in opens)
    assert file_node["driver"] == "file" and file_node["filename"] == "/img/a.qcow2"
    assert fmt_node["driver"] == "qcow2" and fmt_node["file"] == file_node["node-name"]
    export = mounts[0].do.args
    assert export["mountpoint"] == "/img/a.qcow2"
    assert export["node-name"] == fmt_node["node-name"]
    assert export["writable"] is True and export["type"] == "fuse"


def test_command_line_renders_every_step_as_an_option_with_json() -> None:
    weird = "/img/a, b:c.qcow2"
    graph = plan(
        [spec(weird), spec("/img/b.vmdk", layers=(Layer("/img/b.vmdk", "vmdk"),), key_secret="s0")],
        Tuning(nbd_socket="/run/x.sock"),
        {"s0": "/dev/fd/7"},
    )
    argv = graph.command_line()
    options = argv[0::2]
    # Secrets, then nodes, then the NBD server, then the exports: most failures come before
    # anything is mounted.
    order = ["--object", "--blockdev", "--nbd-server", "--export"]
    ranks = [order.index(o) for o in options]
    assert ranks == sorted(ranks) and set(options) == set(order)
    values = [json.loads(v) for v in argv[1::2]]
    secret = values[0]
    assert secret == {"qom-type": "secret", "id": "s0", "file": "/dev/fd/7"}
    server = values[options.index("--nbd-server")]
    assert server == {"addr": {"type": "unix", "path": "/run/x.sock"}}
    # A path with ", " and ":" is a JSON string, never option syntax.
    assert any(v.get("filename") == weird for v in values)
    assert any(v.get("mountpoint") == weird for v in values)
    # NBD exports before the FUSE ones, so that a failure there comes before any mount.
    exports = [v for o, v in zip(options, values, strict=True) if o == "--export"]
    assert [e["type"] for e in exports] == ["nbd", "nbd", "fuse", "fuse"]


@pytest.mark.parametrize("encryption", ["luks", "aes"])
def test_an_encrypted_qcow2_names_its_encryption(encryption: str) -> None:
    """--blockdev requires encrypt.format, and it must be what the header says."""
    graph = plan([spec("/img/a.qcow2", key_secret="s0", encryption=encryption)])
    (fmt,) = [s.do.args for s in graph.all_steps() if s.do.args.get("driver") == "qcow2"]
    assert fmt["encrypt"] == {"format": encryption, "key-secret": "s0"}


def test_a_single_image_is_also_the_default_nbd_export() -> None:
    """As with qemu-nbd without -x, an URI naming no export reaches the one image."""

    def nbd_exports(count: int) -> list[dict[str, object]]:
        specs = [spec(f"/img/{i}.qcow2") for i in range(count)]
        steps = plan(specs, Tuning(nbd_socket="/x.sock")).all_steps()
        return [
            s.do.args
            for s in steps
            if s.do.name == "block-export-add" and s.do.args["type"] == "nbd"
        ]

    one = nbd_exports(1)
    assert [e["name"] for e in one] == ["0.qcow2", ""]
    assert one[0]["node-name"] == one[1]["node-name"] and one[0]["id"] != one[1]["id"]
    assert one[0]["writable"] == one[1]["writable"]
    assert [e["name"] for e in nbd_exports(2)] == ["0.qcow2", "1.qcow2"]


def test_explain_maps_a_failed_option_to_its_image() -> None:
    from fuse_disk_export.engine.daemon import explain
    from fuse_disk_export.errors import LockedError

    graph = plan([spec("/img/a.qcow2"), spec("/img/b.qcow2")])
    steps = list(graph.all_steps())
    option, text = steps[2].option()  # the second image's file node
    assert "/img/b.qcow2" in text
    error = explain([f"{option} {text}: Could not open '/img/b.qcow2': No such file"], graph)
    assert error is not None and error.path == "/img/b.qcow2"
    assert str(error) == "/img/b.qcow2: Could not open '/img/b.qcow2': No such file"

    option, text = steps[-1].option()  # the second export
    lines = [
        "fusermount3: option allow_other only allowed if 'user_allow_other' is set",
        f"{option} {text}: Failed to mount FUSE session to export",
    ]
    error = explain(lines, graph)
    assert error is not None and error.path == "/img/b.qcow2"
    assert error.reason.startswith("Failed to mount FUSE session to export (fusermount3: option")

    option, text = steps[0].option()
    locked = explain([f'{option} {text}: Failed to get "write" lock'], graph)
    assert isinstance(locked, LockedError) and "image is in use" in str(locked)
    assert explain(["something else"], graph) is None


def test_qemu_defaults_are_left_out() -> None:
    nodes = plan([spec()]).phases[0]
    assert all("cache" not in s.do.args and "detect-zeroes" not in s.do.args for s in nodes)
    assert all("aio" not in s.do.args for s in nodes)
    assert all(s.do.args["discard"] == "unmap" for s in nodes), "QEMU's default is ignore"


def test_names_are_unique_and_short() -> None:
    graph = plan([spec(f"/img/{i}.qcow2") for i in range(200)])
    nodes = [s.do.args["node-name"] for s in graph.all_steps() if s.do.name == "blockdev-add"]
    assert len(set(nodes)) == len(nodes)
    assert all(len(str(n)) <= 31 for n in nodes)


def test_awkward_paths_travel_as_json_untouched() -> None:
    path = "/img/my disk,format=raw:x.qcow2"
    graph = plan([spec(path)])
    sent = json.dumps([s.do.args for s in graph.all_steps()])
    assert json.loads(sent)[0]["filename"] == path


def test_read_only_reaches_every_node() -> None:
    graph = plan([spec(writable=False)])
    assert all(s.do.args["read-only"] is True for s in graph.phases[0])
    assert graph.phases[1][0].do.args["writable"] is False


def test_backing_chain_opened_bottom_up_read_only() -> None:
    chain = (
        Layer("/i/top.qcow2", "qcow2"),
        Layer("/i/mid.qcow2", "qcow2", True),
        Layer("/i/base.raw", "raw", True),
    )
    graph = plan([spec("/i/top.qcow2", layers=chain)])
    adds = [s.do.args for s in graph.phases[0]]
    files = [a["filename"] for a in adds if a["driver"] == "file"]
    assert files == ["/i/base.raw", "/i/mid.qcow2", "/i/top.qcow2"]
    by_name = {a["node-name"]: a for a in adds}
    top = adds[-1]
    assert top["read-only"] is False
    mid = by_name[top["backing"]]
    assert mid["driver"] == "qcow2" and mid["read-only"] is True
    base = by_name[mid["backing"]]
    assert base["driver"] == "raw" and "backing" not in base


def test_backing_policies() -> None:
    chain = (Layer("/i/top.qcow2", "qcow2"), Layer("/i/base.qcow2", "qcow2", True))
    none = plan([spec("/i/top.qcow2", layers=chain, backing="none")]).phases[0]
    assert len(none) == 2 and none[-1].do.args["backing"] is None
    anything = plan([spec("/i/top.qcow2", layers=chain, backing="any")]).phases[0]
    assert len(anything) == 2 and "backing" not in anything[-1].do.args


def test_formats_without_backing_support_get_no_backing_key() -> None:
    graph = plan([spec(layers=(Layer("/img/a.qcow2", "vdi"),))])
    assert "backing" not in graph.phases[0][-1].do.args


def test_partition_slice_is_a_raw_node_on_top() -> None:
    graph = plan([spec(slice=Slice(1048576, 4096 * 512))])
    part = graph.phases[0][-1].do.args
    assert part["driver"] == "raw" and part["offset"] == 1048576 and part["size"] == 4096 * 512
    assert graph.phases[1][0].do.args["node-name"] == part["node-name"]


def test_tuning_options_reach_nodes_and_exports() -> None:
    tuning = Tuning(allow_other="off", cache_direct=True, aio="native", discard="ignore")
    graph = plan([spec()], tuning)
    file_node = graph.phases[0][0].do.args
    assert file_node["aio"] == "native" and file_node["cache"] == {
        "direct": True,
        "no-flush": False,
    }
    assert file_node["discard"] == "ignore"
    assert graph.phases[1][0].do.args["allow-other"] == "off"


def test_hole_guard_goes_on_writable_fuse_exports_only() -> None:
    guarded = plan([spec(), spec("/img/r.qcow2", writable=False)], Tuning(hole_guard=True))
    steps = [s.do.args for s in guarded.phases[0]]
    nohole = [a for a in steps if a.get("driver") == "blkdebug"]
    assert len(nohole) == 1 and nohole[0]["discard"] == "unmap"
    rules = nohole[0]["inject-error"]
    assert isinstance(rules, list) and {r["iotype"] for r in rules} == {"discard"}
    assert {r["errno"] for r in rules} == {38}  # ENOSYS: the kernel then says EOPNOTSUPP
    top = next(a for a in steps if a.get("file") == nohole[0]["node-name"])
    assert top["driver"] == "raw" and top["discard"] == "unmap"
    assert guarded.exports[0].node_name == top["node-name"] and guarded.exports[0].hole_guard
    assert not guarded.exports[1].hole_guard
    # With a partition, the partition's raw node sits on the guard.
    part = plan([spec(slice=Slice(4096, 8192))], Tuning(hole_guard=True)).phases[0]
    view = [s.do.args for s in part][-1]
    assert view["driver"] == "raw" and view["offset"] == 4096 and view["discard"] == "unmap"
    # NBD beside FUSE: the FUSE side is read-only, no guard.
    assert not any(
        s.do.args.get("driver") == "blkdebug"
        for s in plan([spec()], Tuning(hole_guard=True, nbd_socket="/x.sock")).all_steps()
    )


def test_read_only_exports_read_through_io_uring_by_default() -> None:
    def aio(graph_specs: list[ImageSpec], tuning: Tuning | None = None) -> list[object]:
        graph = plan(graph_specs, tuning)
        return [
            s.do.args.get("aio") for s in graph.all_steps() if s.do.args.get("driver") == "file"
        ]

    assert aio([spec(writable=False)]) == ["io_uring"]
    assert plan([spec(writable=False)]).default_io_uring
    assert aio([spec()]) == [None]  # writable: the write guard serializes anyway
    vmdk = spec("/img/b.vmdk", layers=(Layer("/img/b.vmdk", "vmdk"),), writable=False)
    assert aio([vmdk]) == [None]  # QEMU can hang opening vmdk extents with io_uring
    chain = (Layer("/i/top.qcow2", "qcow2"), Layer("/i/base.vmdk", "vmdk", read_only=True))
    assert aio([spec("/i/top.qcow2", layers=chain, writable=False)]) == [None, None]
    assert aio([spec(writable=False)], Tuning(aio="threads")) == ["threads"]
    assert not plan([spec(writable=False)], Tuning(aio="io_uring")).default_io_uring
    assert aio([spec(writable=False)], Tuning(io_uring=False)) == [None]


def test_descriptors_the_daemon_holds() -> None:
    # One per file node and one per FUSE export; the guard's filters and format nodes hold none.
    guarded = plan([spec(), spec("/img/b.qcow2")], Tuning(hole_guard=True))
    assert guarded.descriptors() == 4
    # A backing chain opens a file per layer; the NBD server listens on a socket of its own, and
    # its export holds nothing until a client connects.
    chain = spec(layers=(Layer("/img/a.qcow2", "qcow2"), Layer("/img/base.qcow2", "qcow2", True)))
    assert plan([chain]).descriptors() == 3
    assert plan([spec()], Tuning(nbd_socket="/x.sock")).descriptors() == 3
    # A multi-queue export opens /dev/fuse once per iothread (measured on 11.1.3).
    assert plan([spec()], Tuning(iothreads=4, multiqueue=True)).descriptors() == 5
    assert plan([spec()], Tuning(iothreads=1)).descriptors() == 2


def test_overlay_takes_the_writes_over_the_open_image_node() -> None:
    image = Layer("/i/v.vmdk", "vmdk", read_only=True)
    graph = plan([spec("/i/v.vmdk", layers=(image,), overlay="/i/w.qcow2")])
    adds = [s.do.args for s in graph.phases[0]]
    by_name = {a["node-name"]: a for a in adds}
    top = adds[-1]
    assert top["driver"] == "qcow2" and top["read-only"] is False
    assert by_name[top["file"]]["filename"] == "/i/w.qcow2"
    # The backing is the node already open, never the image's path (about to be mounted over).
    below = by_name[top["backing"]]
    assert below["driver"] == "vmdk" and below["read-only"] is True
    assert graph.phases[1][0].do.args["node-name"] == top["node-name"]


def test_read_only_export_opens_its_overlay_read_only() -> None:
    image = Layer("/i/v.vmdk", "vmdk", read_only=True)
    graph = plan([spec("/i/v.vmdk", layers=(image,), overlay="/i/w.qcow2", writable=False)])
    assert all(s.do.args["read-only"] is True for s in graph.phases[0])


def test_iothreads_go_first_and_every_fuse_export_names_them() -> None:
    graph = plan([spec(), spec("/img/b.qcow2")], Tuning(iothreads=2, multiqueue=True))
    opens, mounts = graph.phases
    assert [s.do.args for s in opens[:2]] == [
        {"qom-type": "iothread", "id": "fde-io0"},
        {"qom-type": "iothread", "id": "fde-io1"},
    ]
    assert all(m.do.args["iothread"] == ["fde-io0", "fde-io1"] for m in mounts)
    single = plan([spec()], Tuning(iothreads=1)).phases[1][0].do.args
    assert single["iothread"] == "fde-io0"
    assert "iothread" not in plan([spec()]).phases[1][0].do.args


def test_writable_exports_read_through_io_uring_without_the_guard() -> None:
    def aio(tuning: Tuning) -> object:
        return plan([spec()], tuning).phases[0][0].do.args.get("aio")

    assert aio(Tuning()) is None
    assert aio(Tuning(write_guard=False)) == "io_uring"
    vmdk = spec("/i/a.vmdk", layers=(Layer("/i/a.vmdk", "vmdk"),), writable=False)
    assert plan([vmdk], Tuning(io_uring_short_reads=True)).phases[0][0].do.args["aio"] == "io_uring"


def test_io_uring_only_where_no_read_can_come_back_short() -> None:
    """7.2 and 10.0.2 hang on an io_uring read that the end of a file cuts short."""
    odd = spec("/img/a.raw", layers=(Layer("/img/a.raw", "raw"),), writable=False, odd_sized=True)

    def aio(tuning: Tuning) -> object:
        return plan([odd], tuning).phases[0][0].do.args.get("aio")

    assert aio(Tuning()) is None
    assert aio(Tuning(io_uring_short_reads=True)) == "io_uring"
    assert aio(Tuning(aio="io_uring")) == "io_uring"  # asked for: refused before planning


def test_a_writable_qcow2_export_keeps_its_size() -> None:
    """A truncate through the export would resize a qcow2 for good (QEMU 8.0 and later): a raw
    node of the header's size, in whole sectors, refuses it."""
    graph = plan([spec(size=64 * 2**20 + 100)])
    top = graph.phases[0][-1].do.args
    assert top["driver"] == "raw" and top["size"] == 64 * 2**20 and "offset" not in top
    assert graph.exports[0].node_name == top["node-name"]
    # An overlay takes the writes: it is a qcow2, whatever the image is.
    vmdk = Layer("/i/v.vmdk", "vmdk", read_only=True)
    held = plan([spec("/i/v.vmdk", layers=(vmdk,), overlay="/i/w.qcow2", size=8192)])
    assert held.phases[0][-1].do.args["size"] == 8192
    # Nothing to hold: read-only, other formats (their drivers refuse), the NBD side, no size.
    for free in (
        plan([spec(size=8192, writable=False)]),
        plan([spec("/i/d.vdi", layers=(Layer("/i/d.vdi", "vdi"),), size=8192)]),
        plan([spec(size=8192)], Tuning(nbd_socket="/x.sock")),
        plan([spec()]),
    ):
        assert not any(s.do.args.get("driver") == "raw" for s in free.phases[0])
    # A partition keeps its own range.
    part = plan([spec(slice=Slice(4096, 8192), size=2**20)]).phases[0][-1].do.args
    assert part["offset"] == 4096 and part["size"] == 8192


def test_a_writable_qed_is_written_from_one_thread() -> None:
    qed = spec("/i/d.qed", layers=(Layer("/i/d.qed", "qed"),))
    assert single_queue_image([spec(), qed]) == "/i/d.qed"
    assert single_queue_image([qed._replace(writable=False)]) is None
    assert single_queue_image([qed._replace(overlay="/i/w.qcow2")]) is None
