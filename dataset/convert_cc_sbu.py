"""CC3M+CC12M+SBU captions (BLIP's ccs_synthetic_filtered_large.json) -> img2dataset TSV.

    python convert_cc_sbu.py [--input ccs_synthetic_filtered_large.json] [--output ccs_synthetic_filtered_large.tsv]
"""
import sys

from url_list import main

if __name__ == "__main__":
    sys.exit(main("ccs_synthetic_filtered_large.json"))
