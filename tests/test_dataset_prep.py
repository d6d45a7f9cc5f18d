"""dataset/convert_cc_sbu.py and dataset/convert_laion.py on small fixture files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RECORDS = [
    {"url": "http://a.example/1.jpg", "caption": "a dog running on the beach"},
    {"url": "http://a.example/2.jpg", "caption": "two\tcats on a\nsofa"},  # tab/newline must not break the TSV
    {"url": "http://a.example/3.jpg", "caption": 'a sign saying "stop"'},
    {"url": "", "caption": "no url"},
    {"caption": "missing url"},
    {"url": "http://a.example/6.jpg"},
]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "dataset" / script), *args], capture_output=True, text=True, timeout=60)


def read_tsv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.parametrize("script", ["convert_cc_sbu.py", "convert_laion.py"])
def test_json_list_to_img2dataset_tsv(tmp_path, script):
    src = tmp_path / "captions.json"
    src.write_text(json.dumps(RECORDS))
    proc = run(script, "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    rows = read_tsv(tmp_path / "captions.tsv")
    assert rows == [
        {"url": "http://a.example/1.jpg", "caption": "a dog running on the beach"},
        {"url": "http://a.example/2.jpg", "caption": "two cats on a sofa"},
        {"url": "http://a.example/3.jpg", "caption": 'a sign saying "stop"'},
    ]
    assert (tmp_path / "captions.tsv").read_text().count("\n") == 4  # header + one line per row
    assert "dropped 3 records" in proc.stderr


def test_default_input_name_and_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "dataset" / "convert_cc_sbu.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such file 'ccs_synthetic_filtered_large.json'" in proc.stderr
    (tmp_path / "laion_synthetic_filtered_large.json").write_text(json.dumps(RECORDS[:1]))
    proc = subprocess.run([sys.executable, str(REPO / "dataset" / "convert_laion.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and len(read_tsv(tmp_path / "laion_synthetic_filtered_large.tsv")) == 1


def test_laion_parquet_columns(tmp_path):
    import pyarrow as pa  # the test extra installs it: img2dataset's LAION metadata is parquet
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"URL": ["http://b.example/1.jpg", None], "TEXT": ["a red car", "lost"]}), tmp_path / "part.parquet")
    proc = run("convert_laion.py", "--input", str(tmp_path / "part.parquet"), "--output", str(tmp_path / "out" / "laion.tsv"))
    assert proc.returncode == 0, proc.stderr
    assert read_tsv(tmp_path / "out" / "laion.tsv") == [{"url": "http://b.example/1.jpg", "caption": "a red car"}]


def test_jsonl_input(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert run("convert_cc_sbu.py", "--input", str(src)).returncode == 0
    assert len(read_tsv(tmp_path / "c.tsv")) == 2
