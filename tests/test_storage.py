"""Storage: a local folder or a real S3-compatible server on 127.0.0.1 (SeaweedFS), through pyarrow."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.storage import Storage, display, fetch, is_remote, remote_digest


def test_references_tell_local_paths_from_uris_and_hide_the_query(tmp_path):
    assert not is_remote("/data/x") and not is_remote("runs/x") and not is_remote("C:/x") and not is_remote(None)
    assert not is_remote("builtin:arith-tiny") and not is_remote("meta-llama/Llama-3.2-1B") and not is_remote("file:///x")
    assert is_remote("s3://b/p") and is_remote("gs://b/p")
    uri = "s3://bucket/pre?endpoint_override=127.0.0.1:9000&scheme=http"
    assert display(uri) == "s3://bucket/pre"
    storage = Storage(uri)
    assert storage.remote and storage.path("train/x") == "bucket/pre/train/x"
    assert storage.ref("train/x") == "s3://bucket/pre/train/x?endpoint_override=127.0.0.1:9000&scheme=http"
    local = Storage(tmp_path / "runs")
    assert not local.remote and local.ref("a/b") == str(tmp_path / "runs" / "a" / "b")
    assert fetch(local.ref("a")) == tmp_path / "runs" / "a"  # read in place


def test_a_bad_uri_names_the_storage():
    with pytest.raises(ValueError, match="storage 's3://b/p'.*bogus"):
        Storage("s3://b/p?bogus=1")


def _folder(tmp_path, name="stage"):
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps({"x": 1}))
    (folder / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    return folder


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_write_upload_read_fetch_delete(tmp_path, kind, request, monkeypatch):
    monkeypatch.setenv("FLEXI_STORAGE_CACHE", str(tmp_path / "cache"))
    uri = str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_server").replace(
        "s3://flexi-test", f"s3://flexi-test/{tmp_path.name}")
    storage = Storage(uri)
    storage.check_writable()
    storage.upload(_folder(tmp_path), "train/one")
    storage.write_bytes("train/one/manifest.json", b"{}")
    assert storage.exists("train/one/sub/w.bin") and not storage.exists("train/two")
    assert json.loads(storage.read_text("train/one/a.json")) == {"x": 1}
    local = storage.local_path("train/one")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00" * 1000 and (local / "manifest.json").is_file()
    if kind == "s3":
        assert str(local).startswith(str(tmp_path / "cache")), "a remote folder is downloaded to this node's cache"
        assert fetch(storage.ref("train/one")) == local, "downloaded once: the same copy the second time"
        digest = remote_digest(storage.ref("train/one"))
        storage.write_bytes("train/one/a.json", json.dumps({"x": 22}).encode())  # (listing: size, time)
        again = fetch(storage.ref("train/one"))
        assert again != local and json.loads((again / "a.json").read_text()) == {"x": 22}, "a changed folder is fetched again"
        assert remote_digest(storage.ref("train/one")) != digest
    storage.delete("train/one")
    assert not storage.exists("train/one/a.json")
    if kind == "s3":
        with pytest.raises(FileNotFoundError, match="nothing/here: no such object"):
            fetch(storage.ref("nothing/here"))


def test_an_unreachable_endpoint_is_reported_before_any_work(tmp_path):
    from tests.conftest import free_port

    storage = Storage(f"s3://nobody?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1")
    with pytest.raises(OSError, match=r"storage s3://nobody: cannot write there"):
        storage.check_writable()


def test_no_path_the_project_writes_leaves_the_run_folder(tmp_path):
    from flexi_workflows.storage import child_path

    storage = Storage(tmp_path / "run")
    for rel in ("../x", "eval/../../x", "a/../../../etc/passwd"):
        with pytest.raises(ValueError, match="would lie outside the run's folder"):
            storage.write_bytes(rel, b"x")
        with pytest.raises(ValueError, match="would lie outside the run's folder"):
            storage.local_path(rel)
    storage.write_bytes("/eval/./mini.json", b"{}")  # a leading slash or `.` stays below the root
    assert (tmp_path / "run" / "eval" / "mini.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ValueError, match="not a plain file name"):
        child_path(tmp_path / "run", "../../x.parquet")
