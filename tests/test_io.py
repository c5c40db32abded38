"""Streaming readers (Parquet file/dir/glob, CSV, NDJSON) and the atomic Parquet writer."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nagents_frames.errors import ConfigurationError
from nagents_frames.io import InputFormat, ParquetSink, open_input, resolve_paths


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "text": [f"row {i}" for i in range(start, start + n)]})


def _read_all(source_spec: str | Path, **kw: object) -> pa.Table:
    source = open_input(source_spec)
    return pa.Table.from_batches(list(source.batches(**kw)), schema=source.schema)  # type: ignore[arg-type]


def test_formats_from_suffix() -> None:
    assert InputFormat.from_path("a/b.parquet") is InputFormat.PARQUET
    assert InputFormat.from_path("x.PQ") is InputFormat.PARQUET
    assert InputFormat.from_path("x.csv.gz") is InputFormat.CSV
    assert InputFormat.from_path("x.jsonl") is InputFormat.NDJSON
    with pytest.raises(ConfigurationError, match="--input-format"):
        InputFormat.from_path("x.xlsx")


def test_resolve_file_dir_glob(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.parquet", "d/a.parquet", "d/sub/c.parquet", "d/_SUCCESS", "d/.hidden.parquet", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_paths(tmp_path / "d" / "a.parquet") == [tmp_path / "d" / "a.parquet"]
    assert [p.name for p in resolve_paths(tmp_path / "d")] == ["a.parquet", "b.parquet", "c.parquet"]
    assert [p.name for p in resolve_paths(str(tmp_path / "d" / "*.parquet"))] == ["a.parquet", "b.parquet"]
    assert [p.name for p in resolve_paths(str(tmp_path / "d" / "**" / "*.parquet"))] == [
        "a.parquet", "b.parquet", "c.parquet"
    ]
    with pytest.raises(ConfigurationError, match="does not exist"):
        resolve_paths(tmp_path / "nope.parquet")
    with pytest.raises(ConfigurationError, match="matches no file"):
        resolve_paths(str(tmp_path / "*.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="holds no"):
        resolve_paths(tmp_path / "empty")


def test_parquet_directory_streams_in_order_with_row_count(tmp_path: Path) -> None:
    pq.write_table(_table(25, 0), tmp_path / "part-0.parquet", row_group_size=7)
    pq.write_table(_table(10, 25), tmp_path / "part-1.parquet")
    source = open_input(tmp_path)
    assert source.format is InputFormat.PARQUET and source.num_rows == 35
    batches = list(source.batches(batch_size=4))
    assert all(b.num_rows <= 4 for b in batches)
    assert pa.Table.from_batches(batches).column("id").to_pylist() == list(range(35))


def test_later_files_are_cast_to_the_first_schema(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "text": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["b"], "id": pa.array([2], pa.int32()), "extra": [0]}), tmp_path / "b.parquet")
    table = _read_all(tmp_path)
    assert table.schema == pa.schema([("id", pa.int64()), ("text", pa.string())])
    assert table.to_pydict() == {"id": [1, 2], "text": ["a", "b"]}
    pq.write_table(pa.table({"id": [3]}), tmp_path / "c.parquet")
    with pytest.raises(ConfigurationError, match=r"lacks column\(s\) \['text'\]"):
        _read_all(tmp_path)


def test_column_projection(tmp_path: Path) -> None:
    pq.write_table(_table(5), tmp_path / "a.parquet")
    source = open_input(tmp_path / "a.parquet")
    batch = next(source.batches(columns=["text"]))
    assert batch.schema.names == ["text"]


def test_csv_and_ndjson(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n3,\n')
    table = _read_all(csv)
    assert table.column("id").to_pylist() == [1, 2, 3]
    assert table.column("text").to_pylist() == ["hello, world", "two\nlines", None]
    assert open_input(csv).num_rows is None
    gz = tmp_path / "in.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("id,text\n7,x\n")
    assert _read_all(gz).to_pydict() == {"id": [7], "text": ["x"]}
    nd = tmp_path / "in.jsonl"
    nd.write_text("\n".join(json.dumps({"id": i, "text": f"t{i}"}) for i in range(1000)) + "\n")
    source = open_input(nd)
    assert source.format is InputFormat.NDJSON
    batches = list(source.batches(batch_size=128))
    assert max(b.num_rows for b in batches) <= 128
    assert pa.Table.from_batches(batches).column("id").to_pylist() == list(range(1000))


def test_mixed_formats_and_bad_files_are_refused(tmp_path: Path) -> None:
    pq.write_table(_table(1), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("id\n1\n")
    with pytest.raises(ConfigurationError, match="mixes formats"):
        open_input(tmp_path)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ConfigurationError, match="cannot read"):
        open_input(bad)
    with pytest.raises(ConfigurationError, match="unknown input format"):
        open_input(bad, format="xlsx")


def test_fingerprint_tracks_the_files(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(_table(3), path)
    first = open_input(path).fingerprint()
    assert open_input(path).fingerprint() == first
    pq.write_table(_table(4), path)
    os.utime(path, ns=(1, 1))
    assert open_input(path).fingerprint() != first


def test_sink_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    pq.write_table(pa.table({"old": [1]}), target)
    sink = ParquetSink(target, row_group_rows=10)
    for i in range(5):
        sink.write(_table(7, i * 7).to_batches()[0])
    # mid-way, the target is still the old file and the rows live in a hidden temporary file
    assert pq.read_table(target).column_names == ["old"]
    assert sink.tmp_path.exists() and sink.tmp_path.name.startswith(".out.parquet.tmp-")
    sink.abort()
    assert not sink.tmp_path.exists()
    assert pq.read_table(target).column_names == ["old"]

    with pytest.raises(RuntimeError, match="boom"), ParquetSink(target) as failing:
        failing.write(_table(3).to_batches()[0])
        raise RuntimeError("boom")
    assert pq.read_table(target).column_names == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]

    with ParquetSink(target, row_group_rows=10) as ok:
        for i in range(5):
            ok.write(_table(7, i * 7).to_batches()[0])
    result = pq.ParquetFile(target)
    assert result.metadata.num_rows == 35
    assert result.metadata.num_row_groups <= 4  # batches gathered into row groups, not one per batch
    assert pq.read_table(target).column("id").to_pylist() == list(range(35))


def test_sink_empty_output_uses_the_given_schema(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.int64()), ("response", pa.string()), ("error", pa.string())])
    with ParquetSink(tmp_path / "empty.parquet", schema=schema):
        pass
    assert pq.read_schema(tmp_path / "empty.parquet") == schema
    with pytest.raises(ConfigurationError, match="no rows and no schema"), ParquetSink(tmp_path / "none.parquet"):
        pass
    assert not (tmp_path / "none.parquet").exists()


def test_sink_refuses_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is a directory"):
        ParquetSink(tmp_path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        ParquetSink(tmp_path / "missing" / "out.parquet")


def test_sink_casts_later_batches(tmp_path: Path) -> None:
    target = tmp_path / "o.parquet"
    with ParquetSink(target) as sink:
        sink.write(pa.record_batch({"error": pa.array(["x"], pa.string())}))
        sink.write(pa.record_batch({"error": pa.array([None], pa.null())}))
    assert pq.read_table(target).column("error").to_pylist() == ["x", None]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
    batch_size=st.integers(min_value=1, max_value=50),
)
def test_roundtrip_any_split(tmp_path: Path, sizes: list[int], batch_size: int) -> None:
    folder = tmp_path / f"case-{'-'.join(map(str, sizes))}-{batch_size}"
    folder.mkdir(exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        pq.write_table(_table(n, start), folder / f"part-{i:03d}.parquet", row_group_size=max(n // 2, 1))
        start += n
    source = open_input(folder)
    out = folder.parent / f"{folder.name}.parquet"
    with ParquetSink(out, schema=source.schema, row_group_rows=17) as sink:
        for batch in source.batches(batch_size):
            assert 0 < batch.num_rows <= batch_size
            sink.write(batch)
    assert pq.read_table(out).column("id").to_pylist() == list(range(start))
