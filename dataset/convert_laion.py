"""LAION-115M captions (BLIP's laion_synthetic_filtered_large.json, or a LAION parquet) -> img2dataset TSV.

    python convert_laion.py [--input laion_synthetic_filtered_large.json] [--output laion_synthetic_filtered_large.tsv]
"""
import sys

from url_list import main

if __name__ == "__main__":
    sys.exit(main("laion_synthetic_filtered_large.json"))
