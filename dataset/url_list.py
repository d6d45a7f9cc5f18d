"""Turn a caption list (BLIP's ``*_synthetic_filtered_large.json`` or a parquet file) into the
TSV that ``img2dataset --input_format tsv --url_col url --caption_col caption`` reads.

Shared by ``convert_cc_sbu.py`` and ``convert_laion.py``. Rows without a URL or caption are
dropped and counted; tabs and newlines inside captions become spaces, because a TSV row must stay
one line and img2dataset does not unquote.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger("convert")

URL_KEYS = ("url", "URL", "image_url")
CAPTION_KEYS = ("caption", "TEXT", "text")


def read_rows(path: Path) -> Iterator[dict]:
    """Records of a ``.json`` list, a ``.jsonl`` file or a ``.parquet`` table."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise SystemExit(f"{path}: expected a JSON list of {{\"url\": ..., \"caption\": ...}} records, got {type(data).__name__}")
        yield from data


def _first(row: dict, keys: Iterable[str]):
    return next((row[k] for k in keys if isinstance(row, dict) and row.get(k)), None)


def convert(input_path: Path, output_path: Path) -> tuple[int, int]:
    """Write the TSV; returns ``(rows written, rows dropped)``."""
    written = dropped = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["url", "caption"])
        for row in read_rows(input_path):
            url, caption = _first(row, URL_KEYS), _first(row, CAPTION_KEYS)
            if not isinstance(url, str) or not isinstance(caption, str):
                dropped += 1
                continue
            clean = [" ".join(value.split()) for value in (url, caption)]
            if not all(clean):
                dropped += 1
                continue
            writer.writerow(clean)
            written += 1
    tmp.replace(output_path)
    if dropped:
        logger.warning("%s: dropped %d records without a url or caption", input_path, dropped)
    logger.info("wrote %d rows to %s", written, output_path)
    return written, dropped


def main(default_input: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=default_input, help=f"caption list (.json, .jsonl or .parquet; default {default_input})")
    parser.add_argument("--output", default=None, help="TSV to write (default: the input with .tsv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    input_path = Path(args.input)
    if not input_path.is_file():
        print(f"error: --input: no such file '{input_path}'", file=sys.stderr)
        return 2
    convert(input_path, Path(args.output) if args.output else input_path.with_suffix(".tsv"))
    return 0
