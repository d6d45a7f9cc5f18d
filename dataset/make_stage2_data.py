"""Make a stage-2 set from your own images, the paper's recipe (section 3.2): describe, continue, polish, filter.

    python dataset/make_stage2_data.py --cfg-path eval_configs/minigpt4_eval.yaml --image-dir DIR \
        --out DIR/annotations.jsonl [--polish-model PATH] [--batch-size N] [--options model.ckpt=...]

Writes DIR/annotations.jsonl in the image_text_json format, ready for
train_configs/minigpt4_finetune_own_data.yaml. Run the same command again to resume. The logic lives in
minigpt4/apps/stage2_data.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minigpt4.apps.stage2_data import main  # noqa: E402

if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
