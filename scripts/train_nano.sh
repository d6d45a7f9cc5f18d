#!/usr/bin/env bash
# The nano MiniGPT-4 from nothing: stage 0 (the vision side alone), stage 1 (captioning into the
# frozen SmolLM2, only llama_proj learns), stage 2 (questions), its two describe-weighted
# continuations (2d, 2e in docs/nano.md), the conversation stage (2f: llama_proj and LoRA),
# stage 0b (the vision side learns other drawings from its frozen self), stage 0c (and where the
# shapes are), 2g (the conversations again, reading the places), stage 0d (each shape in one query
# token), 2i and 2k (the conversations reading those tokens), stage 0e (each shape kind in one
# query token), 2n (the conversations reading them, with hard questions), 2p (more of 2n, more
# of it about places and "is there"), 2s (2p's mix, the loss on every answer), 2v (2s's stage
# with LoRA on the MLPs too), 2w and 2x (more of 2v), 2y and 2z (from 2x's fp16 weights file, more
# "is there" and "where", 2z with mostly hard questions), 2za (from 2z's fp16 weights file, 2z's mix
# with fewer hard questions at a low rate), then the shipped weights file (fp16) and its score on
# 200 held-out scenes. Each stage resumes from its newest
# checkpoint and a finished stage is skipped, so the script can be stopped and started again at
# any point.
#
#   bash scripts/train_nano.sh                 # CPU: many hours on 2 cores
#   DEVICE=cuda bash scripts/train_nano.sh     # one GPU: minutes (bf16 autocast, 8 loader workers)
#   OUT=/tmp/nano bash scripts/train_nano.sh   # somewhere other than ./output
#   EXTRA_OPTS="model.llama_model=/path/SmolLM2-135M-Instruct.Q4_1.gguf" ...  # more --options for every step
#   EVAL_N=50 bash scripts/train_nano.sh       # score fewer held-out scenes (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cpu}"
OUT="${OUT:-output}"
PYTHON="${PYTHON:-python}"
read -ra extra <<< "${EXTRA_OPTS:-}"
opts=("run.device=$DEVICE")
if [[ "$DEVICE" == cuda* ]]; then
    opts+=(run.amp=True run.amp_dtype=bfloat16 "run.num_workers=${WORKERS:-8}")
fi

# the last checkpoint of each stage (run.max_epoch - 1 in its config)
S0="$OUT/minigpt4_nano_stage0/run/checkpoint_7.pth"
S1="$OUT/minigpt4_nano_stage1/run/checkpoint_3.pth"
S2="$OUT/minigpt4_nano_stage2/run/checkpoint_5.pth"
S2D="$OUT/minigpt4_nano_stage2d/run/checkpoint_0.pth"
S2E="$OUT/minigpt4_nano_stage2e/run/checkpoint_0.pth"
S2F="$OUT/minigpt4_nano_stage2f/run/checkpoint_0.pth"
S0B="$OUT/minigpt4_nano_stage0b/run/checkpoint_0.pth"
S0C="$OUT/minigpt4_nano_stage0c/run/checkpoint_0.pth"
S2G="$OUT/minigpt4_nano_stage2g/run/checkpoint_0.pth"
S0D="$OUT/minigpt4_nano_stage0d/run/checkpoint_0.pth"
S2I="$OUT/minigpt4_nano_stage2i/run/checkpoint_0.pth"
S2K="$OUT/minigpt4_nano_stage2k/run/checkpoint_0.pth"
AFTER_2K="$OUT/minigpt4_nano_after_2k.pth"
S0E="$OUT/minigpt4_nano_stage0e/run/checkpoint_0.pth"
S2N="$OUT/minigpt4_nano_stage2n/run/checkpoint_0.pth"
S2P="$OUT/minigpt4_nano_stage2p/run/checkpoint_0.pth"
S2S="$OUT/minigpt4_nano_stage2s/run/checkpoint_0.pth"
S2V="$OUT/minigpt4_nano_stage2v/run/checkpoint_0.pth"
S2W="$OUT/minigpt4_nano_stage2w/run/checkpoint_0.pth"
S2X="$OUT/minigpt4_nano_stage2x/run/checkpoint_0.pth"
AFTER_2X="$OUT/minigpt4_nano_after_2x.pth"
S2Y="$OUT/minigpt4_nano_stage2y/run/checkpoint_0.pth"
S2Z="$OUT/minigpt4_nano_stage2z/run/checkpoint_0.pth"
AFTER_2Z="$OUT/minigpt4_nano_after_2z.pth"
S2ZA="$OUT/minigpt4_nano_stage2za/run/checkpoint_0.pth"

train() {  # config, output dir, extra options...
    "$PYTHON" train.py --cfg-path "$1" --resume auto --options "${opts[@]}" "run.output_dir=$2" "${@:3}" "${extra[@]}"
}
# The LLM's LoRA: the model config puts it on the attention and the MLPs, as shipped; the stages
# before 2v trained it on the attention alone.
attention_lora="model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]"
[[ -f "$S0" ]] || train train_configs/minigpt4_nano_stage0.yaml "$OUT/minigpt4_nano_stage0"
[[ -f "$S1" ]] || train train_configs/minigpt4_nano_stage1.yaml "$OUT/minigpt4_nano_stage1" "model.ckpt=$S0"
[[ -f "$S2" ]] || train train_configs/minigpt4_nano_stage2.yaml "$OUT/minigpt4_nano_stage2" "model.ckpt=[$S0,$S1]"
# Describing loses ground to the other questions in stage 2: win it back with more "describe".
[[ -f "$S2D" ]] || train train_configs/minigpt4_nano_stage2.yaml "$OUT/minigpt4_nano_stage2d" "model.ckpt=[$S0,$S2]" \
    datasets.synthetic_shapes.build_info.seed=5 "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,describe,describe,count,colour,where]" \
    run.init_lr=2e-4 run.min_lr=1e-5 run.warmup_steps=20 run.max_epoch=1 run.iters_per_epoch=2000
[[ -f "$S2E" ]] || train train_configs/minigpt4_nano_stage2.yaml "$OUT/minigpt4_nano_stage2e" "model.ckpt=[$S0,$S2D]" \
    datasets.synthetic_shapes.batch_size=16 datasets.synthetic_shapes.build_info.seed=7 \
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,describe,describe,describe,count,colour,where]" \
    run.init_lr=5e-5 run.min_lr=5e-6 run.warmup_steps=10 run.max_epoch=1 run.iters_per_epoch=800
# Conversations: follow-up questions with the earlier turns in view; LoRA joins llama_proj.
[[ -f "$S2F" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2f" "model.ckpt=[$S0,$S2E]" "$attention_lora"
# Other shades, sizes and anti-aliasing: a student of stage 0's vision side, its frozen self the teacher.
[[ -f "$S0B" ]] || train train_configs/minigpt4_nano_stage0b.yaml "$OUT/minigpt4_nano_stage0b" "model.ckpt=$S0"
# Where the shapes are (which third): a place head on the student, the MSE keeping the rest.
[[ -f "$S0C" ]] || train train_configs/minigpt4_nano_stage0c.yaml "$OUT/minigpt4_nano_stage0c" "model.ckpt=[$S0,$S0B]"
# The conversations again, on 0c's vision side: chats of 1-3 turns, more questions about places
# ("where" a third of them), colours and "is there". 2i runs the same mix again.
chat_mix=("datasets.synthetic_shapes.build_info.turns=[1,3]"
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,where,where,where,exists,exists]"
    run.init_lr=1.5e-4 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=600)
[[ -f "$S2G" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2g" "model.ckpt=[$S0,$S2F,$S0C]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=31 "${chat_mix[@]}"
# Each shape in one query token (slot i's shape and place from token i alone), the MSE keeping the rest.
[[ -f "$S0D" ]] || train train_configs/minigpt4_nano_stage0d.yaml "$OUT/minigpt4_nano_stage0d" "model.ckpt=[$S0,$S0C]"
# 2g's mix once more, reading 0d's tokens.
[[ -f "$S2I" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2i" "model.ckpt=[$S0,$S2G,$S0D]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=43 "${chat_mix[@]}"
# Shorter chats, fewer of them opening with "describe": more questions answered from the picture alone.
[[ -f "$S2K" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2k" "model.ckpt=[$S0,$S0D,$S2I]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=53 "datasets.synthetic_shapes.build_info.turns=[1,2]" datasets.synthetic_shapes.build_info.first_describe=0.3 \
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,colour,where,where,where,exists,exists]" \
    run.init_lr=1.5e-4 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=400

export_weights() {  # output file, dtype (export --dtype), checkpoints (the later win), more options...
    "$PYTHON" -m minigpt4.apps.export --cfg-path train_configs/minigpt4_nano_stage2_chat.yaml --out "$1" --dtype "$2" \
        --options "model.ckpt=$3" "${@:4}" "${extra[@]}"
}
# Each shape kind in one query token (the colour and place of the circle, the square, the triangle),
# from the weights file after 2k (so 0d's vision side, with fresh heads), the MSE keeping the rest.
[[ -f "$AFTER_2K" || -f "$S0E" ]] || export_weights "$AFTER_2K" float32 "[$S0,$S0D,$S2K]" "$attention_lora"
[[ -f "$S0E" ]] || train train_configs/minigpt4_nano_stage0e.yaml "$OUT/minigpt4_nano_stage0e" "model.ckpt=$AFTER_2K"
# The conversations reading 0e's tokens: half the "where" and "no" questions ones the text cannot answer.
[[ -f "$S2N" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2n" "model.ckpt=[$S0,$S2K,$S0E]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=71 "datasets.synthetic_shapes.build_info.turns=[1,3]" \
    datasets.synthetic_shapes.build_info.first_describe=0.4 datasets.synthetic_shapes.build_info.hard_questions=0.5 \
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,colour,where,where,where,exists,exists]" \
    run.init_lr=1.5e-4 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=700
# 2n's chats longer, with more "where" and "is there" and fewer hard questions.
[[ -f "$S2P" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2p" "model.ckpt=[$S0,$S2K,$S0E,$S2N]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=79 "datasets.synthetic_shapes.build_info.turns=[1,3]" \
    datasets.synthetic_shapes.build_info.first_describe=0.4 datasets.synthetic_shapes.build_info.hard_questions=0.3 \
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,where,where,where,exists,exists,exists,exists]" \
    run.init_lr=1e-4 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=450

# Chats of 1-4 turns, trained on every answer of a chat (not only the last); 2p's mix in them.
every_answer_chats=("datasets.synthetic_shapes.build_info.turns=[1,4]"
    datasets.synthetic_shapes.build_info.first_describe=0.4 datasets.synthetic_shapes.build_info.every_answer=True)
every_answer_mix=("${every_answer_chats[@]}" datasets.synthetic_shapes.build_info.hard_questions=0.3
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,where,where,where,exists,exists,exists,exists]")
[[ -f "$S2S" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2s" "model.ckpt=[$S0,$S2K,$S0E,$S2P]" "$attention_lora" \
    datasets.synthetic_shapes.build_info.seed=97 "${every_answer_mix[@]}" \
    run.init_lr=8e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=500

# 2s's stage again with LoRA on the MLPs as well (new adapters, B at zero, from 2s's weights).
[[ -f "$S2V" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2v" "model.ckpt=[$S0,$S2K,$S0E,$S2S]" \
    datasets.synthetic_shapes.build_info.seed=107 "${every_answer_mix[@]}" \
    run.init_lr=1e-4 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=400
# More of 2v, twice, at lower rates.
[[ -f "$S2W" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2w" "model.ckpt=[$S0,$S2K,$S0E,$S2V]" \
    datasets.synthetic_shapes.build_info.seed=109 "${every_answer_mix[@]}" \
    run.init_lr=6e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=280
[[ -f "$S2X" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2x" "model.ckpt=[$S0,$S2K,$S0E,$S2W]" \
    datasets.synthetic_shapes.build_info.seed=113 "${every_answer_mix[@]}" \
    run.init_lr=5e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=300

# 2x's weights file, as it shipped (fp16: with the MLP adapters the file is 15.7 MB in fp32, 7.9 MB
# in fp16); 2y and 2z start from it. Their mix: six "is there" and four "where" in fourteen questions.
[[ -f "$AFTER_2X" ]] || export_weights "$AFTER_2X" float16 "[$S0,$S2K,$S0E,$S2X]"
exists_mix=("${every_answer_chats[@]}"
    "datasets.synthetic_shapes.build_info.prompt_kinds=[describe,count,colour,colour,where,where,where,where,exists,exists,exists,exists,exists,exists]")
[[ -f "$S2Y" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2y" "model.ckpt=$AFTER_2X" \
    datasets.synthetic_shapes.build_info.seed=127 "${exists_mix[@]}" datasets.synthetic_shapes.build_info.hard_questions=0.5 \
    run.init_lr=5e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=300
# 2y's mix with mostly hard questions (most "no" answers to "is there" a crossed pair) at a higher rate.
[[ -f "$S2Z" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2z" "model.ckpt=[$AFTER_2X,$S2Y]" \
    datasets.synthetic_shapes.build_info.seed=131 "${exists_mix[@]}" datasets.synthetic_shapes.build_info.hard_questions=0.8 \
    run.init_lr=8e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=300

# 2z's weights file, as it shipped; 2za starts from it. 2z's mix with fewer hard questions (as in
# 2x) at a low rate: the "yes" for a shape that is there (the middle of three) back, the crossed
# pairs kept.
[[ -f "$AFTER_2Z" ]] || export_weights "$AFTER_2Z" float16 "[$AFTER_2X,$S2Y,$S2Z]"
[[ -f "$S2ZA" ]] || train train_configs/minigpt4_nano_stage2_chat.yaml "$OUT/minigpt4_nano_stage2za" "model.ckpt=$AFTER_2Z" \
    datasets.synthetic_shapes.build_info.seed=137 "${exists_mix[@]}" datasets.synthetic_shapes.build_info.hard_questions=0.3 \
    run.init_lr=5e-5 run.min_lr=1e-5 run.warmup_steps=10 run.iters_per_epoch=300

export_weights "$OUT/minigpt4_nano.pth" float16 "[$AFTER_2Z,$S2ZA]"
"$PYTHON" -m minigpt4.apps.eval_shapes -n "${EVAL_N:-200}" --options "model.ckpt=$(realpath "$OUT/minigpt4_nano.pth")" "${extra[@]}" | tee "$OUT/eval.json"
echo "weights: $OUT/minigpt4_nano.pth (copy to minigpt4/weights/ to ship them)"
