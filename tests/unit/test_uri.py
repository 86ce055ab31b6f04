"""Storage URIs: atomic writes, listing, traversal refusal, retries."""

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io import uri


def test_join_refuses_escape() -> None:
    assert uri.join("s3://b/g", "versions", "v1") == "s3://b/g/versions/v1"
    for bad in ("..", "../x", "a/../../b", "/etc/passwd"):
        with pytest.raises(ValueError, match="would escape"):
            uri.join("/g", bad)


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = str(tmp_path / "d" / "f.bin")
    with pytest.raises(RuntimeError), uri.open_atomic(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not Path(target).exists()
    assert list((tmp_path / "d").iterdir()) == []
    uri.write_bytes(target, b"whole")
    assert uri.read_bytes(target) == b"whole"


def test_stream_writer_visible_only_on_close(tmp_path: Path) -> None:
    target = str(tmp_path / "s.parquet")
    w = uri.ParquetStreamWriter(target, pa.schema([("a", pa.int64())]))
    w.write(pa.record_batch([pa.array([1, 2])], names=["a"]))
    assert not Path(target).exists()
    w.close()
    assert uri.read_table(target)["a"].to_pylist() == [1, 2]
    assert uri.parquet_num_rows(target) == 2


def test_parquet_files_and_missing(tmp_path: Path) -> None:
    for n in ("b.parquet", "a.parquet", ".hidden.parquet", "x.txt"):
        (tmp_path / n).write_bytes(b"")
    files = uri.parquet_files(str(tmp_path))
    assert [Path(f).name for f in files] == ["a.parquet", "b.parquet"]
    with pytest.raises(FileNotFoundError, match="nope"):
        uri.parquet_files(str(tmp_path / "nope"))


def test_retries_then_gives_up_naming_object() -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("transient")
        return 7

    assert uri.with_retries(flaky, "read x", attempts=5, base_delay=0.001) == 7
    assert len(calls) == 3
    with pytest.raises(uri.StorageError, match="read s3://b/k: failed after 2 attempts"):
        uri.with_retries(
            lambda: (_ for _ in ()).throw(OSError("down")),
            "read s3://b/k",
            attempts=2,
            base_delay=0.001,
        )
