"""stripefs:// through fsspec (fs/fsspec.py) against a real cluster: the protocol found by
its entry point, round trips, ranges, the tree calls, labels, threads and a forked child,
and the libraries that take URLs (pandas/pyarrow Parquet, Hugging Face datasets)."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import multiprocessing
import os

import fsspec
import pytest

from cluster import Cluster

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def spec_cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("fsspec"), dataservers=3) as c:
        yield c


@pytest.fixture(scope="module")
def sfs(spec_cluster):
    """The filesystem object fsspec makes for this cluster's URLs (cached by fsspec: every
    test of the module shares its session)."""
    fs = fsspec.filesystem("stripefs", meta=spec_cluster.meta_addr, credentials=str(spec_cluster.client))
    yield fs
    fs.close_session()
    fs.clear_instance_cache()


@pytest.fixture
def base(sfs, request):
    """A fresh directory of its own for each test, and its URL."""
    path = "/" + request.node.name.replace("[", "_").replace("]", "")
    sfs.makedirs(path, exist_ok=True)
    return path


def url(cluster, path: str) -> str:
    return f"stripefs://{cluster.meta_addr}{path}"


def opts(cluster) -> dict:
    return {"credentials": str(cluster.client)}


def test_protocol_is_registered_by_its_entry_point():
    from stripefs.fsspec import StripeFileSystem

    assert fsspec.get_filesystem_class("stripefs") is StripeFileSystem


def test_url_parsing(spec_cluster):
    from stripefs.fsspec import StripeFileSystem

    assert StripeFileSystem._strip_protocol("stripefs://a:1,b:2/x/y/") == "/x/y"
    assert StripeFileSystem._strip_protocol("stripefs:///x//y/../z") == "/x/z"
    assert StripeFileSystem._strip_protocol("stripefs://a:1") == "/"
    assert StripeFileSystem._get_kwargs_from_urls("stripefs://a:1,b:2/x") == {"meta": "a:1,b:2"}
    assert StripeFileSystem._get_kwargs_from_urls("stripefs:///x") == {}
    fs, path = fsspec.core.url_to_fs(url(spec_cluster, "/d/f"), **opts(spec_cluster))
    assert path == "/d/f" and fs.meta == spec_cluster.meta_addr
    assert fs.unstrip_protocol("/d/f") == url(spec_cluster, "/d/f")


def test_round_trip_and_ranges(spec_cluster, sfs, base):
    data = os.urandom(9 * 1024 * 1024 + 12345)  # three 4 MiB blocks, the last partial
    with fsspec.open(url(spec_cluster, f"{base}/big"), "wb", **opts(spec_cluster)) as f:
        for off in range(0, len(data), 1_000_000):
            f.write(data[off:off + 1_000_000])
    # A second session (another client, as another machine) sees it whole after close.
    other = fsspec.filesystem("stripefs", meta=spec_cluster.meta_addr, credentials=str(spec_cluster.client),
                              skip_instance_cache=True)
    try:
        assert hashlib.sha256(other.cat_file(f"{base}/big")).digest() == hashlib.sha256(data).digest()
        assert other.info(f"{base}/big")["size"] == len(data)
    finally:
        other.close_session()
    with sfs.open(f"{base}/big", "rb") as f:
        f.seek(4 * 1024 * 1024 - 10)
        assert f.read(20) == data[4 * 1024 * 1024 - 10:4 * 1024 * 1024 + 10]
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
    assert sfs.cat_file(f"{base}/big", start=100, end=200) == data[100:200]
    assert sfs.cat_file(f"{base}/big", start=-7) == data[-7:]
    assert sfs.cat_file(f"{base}/big", start=len(data) + 10) == b""
    sfs.pipe_file(f"{base}/small", b"hello")
    got = sfs.cat_ranges([f"{base}/big", f"{base}/small", f"{base}/big", f"{base}/missing"],
                         [0, 1, 8 * 1024 * 1024, 0], [10, 4, 8 * 1024 * 1024 + 3, 1])
    assert got[:3] == [data[:10], b"ell", data[8 * 1024 * 1024:8 * 1024 * 1024 + 3]]
    assert isinstance(got[3], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        sfs.cat_ranges([f"{base}/missing"], [0], [1], on_error="raise")


def test_modes(sfs, base):
    sfs.pipe_file(f"{base}/a", b"one")
    with sfs.open(f"{base}/a", "ab") as f:
        f.write(b"-two")
    assert sfs.cat_file(f"{base}/a") == b"one-two"
    with pytest.raises(FileExistsError):
        sfs.open(f"{base}/a", "xb")
    with sfs.open(f"{base}/new", "xb") as f:
        f.write(b"x")
    with sfs.open(f"{base}/a", "wb") as f:
        f.write(b"3")
    assert sfs.cat_file(f"{base}/a") == b"3"
    with pytest.raises(FileNotFoundError):
        sfs.open(f"{base}/nope", "rb")
    with pytest.raises(IsADirectoryError):
        sfs.open(base, "rb")
    with pytest.raises(FileNotFoundError):
        sfs.open(f"{base}/no/such/dir/file", "wb")


def test_tree_calls_and_labels(sfs, base):
    sfs.makedirs(f"{base}/d/e")
    with pytest.raises(FileExistsError):
        sfs.makedirs(f"{base}/d/e", exist_ok=False)
    sfs.pipe_file(f"{base}/d/f1", b"1" * 10)
    sfs.pipe_file(f"{base}/d/e/f2", b"22")
    assert sorted(sfs.ls(f"{base}/d", detail=False)) == [f"{base}/d/e", f"{base}/d/f1"]
    entries = {e["name"]: e for e in sfs.ls(f"{base}/d")}
    assert entries[f"{base}/d/e"]["type"] == "directory"
    assert entries[f"{base}/d/f1"]["type"] == "file" and entries[f"{base}/d/f1"]["size"] == 10
    assert sorted(sfs.find(base)) == [f"{base}/d/e/f2", f"{base}/d/f1"]
    assert sfs.du(base) == 12  # the metaserver's usage counters
    assert sfs.du(base, total=False) == {f"{base}/d/e/f2": 2, f"{base}/d/f1": 10}  # fsspec's walk
    assert sfs.isdir(f"{base}/d") and sfs.isfile(f"{base}/d/f1") and not sfs.exists(f"{base}/d/zz")
    assert sfs.info(f"{base}/d/f1")["labels"] == {}
    sfs.setxattr(f"{base}/d/f1", "user.split", "train")
    sfs.setxattr(f"{base}/d/f1", "user.class", "cat")
    info = sfs.info(f"{base}/d/f1")
    assert info["labels"] == {"class": "cat", "split": "train"}
    assert sfs.getxattr(f"{base}/d/f1", "user.split") == b"train"
    assert sfs.modified(f"{base}/d/f1").timestamp() == pytest.approx(info["mtime"])
    with pytest.raises(FileNotFoundError):
        sfs.info(f"{base}/d/zz")
    with pytest.raises(NotADirectoryError):
        sfs.info(f"{base}/d/f1/x")


def test_copy_move_remove(sfs, base):
    sfs.pipe_file(f"{base}/src", b"payload" * 1000)
    sfs.cp_file(f"{base}/src", f"{base}/copy")
    assert sfs.cat_file(f"{base}/copy") == b"payload" * 1000
    ino = sfs.info(f"{base}/src")["ino"]
    sfs.mkdir(f"{base}/into")
    sfs.mv(f"{base}/src", f"{base}/into")  # into an existing directory, as shutil.move
    assert sfs.info(f"{base}/into/src")["ino"] == ino  # renamed, not copied
    sfs.mv(f"{base}/into", f"{base}/renamed")
    assert sfs.cat_file(f"{base}/renamed/src") == b"payload" * 1000
    sfs.makedirs(f"{base}/renamed/sub")
    sfs.pipe_file(f"{base}/renamed/sub/deep", b"x")
    with pytest.raises(OSError) as err:
        sfs.rm(f"{base}/renamed")
    assert err.value.errno == errno.ENOTEMPTY
    sfs.rm(f"{base}/renamed", recursive=True)
    assert not sfs.exists(f"{base}/renamed")
    sfs.touch(f"{base}/t")
    assert sfs.info(f"{base}/t")["size"] == 0
    sfs.rm([f"{base}/t", f"{base}/copy"])
    assert sfs.ls(base, detail=False) == []


def test_threads_share_one_session(sfs, base):
    blobs = {f"{base}/t{i}": os.urandom(300_000 + i) for i in range(16)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: sfs.pipe_file(*kv), blobs.items()))
        got = dict(zip(blobs, pool.map(sfs.cat_file, blobs)))
    assert got == blobs


def _child_reads(fs, path, queue):
    try:
        queue.put(fs.cat_file(path))
    except BaseException as exc:  # reported to the parent
        queue.put(repr(exc))


def test_forked_child_gets_a_session_of_its_own(sfs, base):
    sfs.pipe_file(f"{base}/f", b"from the parent")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(sfs, f"{base}/f", queue))
    child.start()
    try:
        assert queue.get(timeout=60) == b"from the parent"
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert sfs.cat_file(f"{base}/f") == b"from the parent"  # the parent's session still works


def test_environment_names_the_cluster(spec_cluster, monkeypatch, base, sfs):
    sfs.pipe_file(f"{base}/f", b"env")
    monkeypatch.setenv("STRIPEFS_META", spec_cluster.meta_addr)
    monkeypatch.setenv("STRIPEFS_CREDENTIALS", str(spec_cluster.client))
    with fsspec.open(f"stripefs://{base}/f", "rb") as f:
        assert f.read() == b"env"
    fsspec.filesystem("stripefs").close_session()


def test_pandas_parquet(spec_cluster, base):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"label": ["cat", "dog", "cat"] * 1000, "x": range(3000), "y": [0.5] * 3000})
    target = url(spec_cluster, f"{base}/table.parquet")
    df.to_parquet(target, storage_options=opts(spec_cluster))
    back = pd.read_parquet(target, storage_options=opts(spec_cluster))
    pd.testing.assert_frame_equal(back, df)
    # pyarrow's own dataset reader over the same filesystem, with a filter
    import pyarrow.dataset as pads

    fs, path = fsspec.core.url_to_fs(target, **opts(spec_cluster))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(filter=pads.field("label") == "dog")
    assert table.num_rows == 1000


def test_huggingface_datasets_save_and_load(spec_cluster, base):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"sample {i}" for i in range(2000)], "label": [i % 3 for i in range(2000)]})
    target = url(spec_cluster, f"{base}/ds")
    ds.save_to_disk(target, storage_options=opts(spec_cluster), num_shards=2)
    back = datasets.load_from_disk(target, storage_options=opts(spec_cluster))
    assert back.num_rows == 2000
    assert back["text"][:3] == ["sample 0", "sample 1", "sample 2"]
    assert back["label"] == ds["label"]


def test_url_with_several_metaservers_moves_past_a_dead_one(spec_cluster, sfs, base):
    sfs.pipe_file(f"{base}/f", b"listed")
    dead = "127.0.0.1:1"  # nothing listens there: the client moves on to the next address
    fs, path = fsspec.core.url_to_fs(f"stripefs://{dead},{spec_cluster.meta_addr}{base}/f", **opts(spec_cluster))
    try:
        assert fs.meta == f"{dead},{spec_cluster.meta_addr}"
        assert fs.cat_file(path) == b"listed"
    finally:
        fs.close_session()
