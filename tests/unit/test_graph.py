"""The planner is pure: what it sends to QEMU is checked here without any process."""

from __future__ import annotations

import json

from fuse_disk_export.engine.graph import ImageSpec, Layer, Slice, Tuning, plan


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


def test_exports_and_only_exports_have_an_undo() -> None:
    graph = plan([spec(), spec("/img/b.vmdk", layers=(Layer("/img/b.vmdk", "vmdk"),))])
    for step in graph.all_steps():
        if step.do.name == "block-export-add":
            assert step.undo is not None and step.undo.name == "block-export-del"
            assert step.undo.args == {"id": step.do.args["id"], "mode": "hard"}
        else:
            assert step.undo is None, "nodes are closed by quit"


def test_qemu_defaults_are_left_out() -> None:
    nodes = plan([spec(writable=False)]).phases[0]
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
