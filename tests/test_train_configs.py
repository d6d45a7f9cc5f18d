"""train_configs/*.yaml and prompts/alignment.txt hold the original release's values."""
from __future__ import annotations

from pathlib import Path

import pytest

from minigpt4.common.config import Config
from minigpt4.common.registry import registry

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"

PROMPTS = [
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
]


def load(name: str) -> Config:
    return Config(cfg_path=str(CONFIGS / name))


@pytest.mark.parametrize("variant", ["", "llama2_"])
def test_stage1(variant):
    cfg = load(f"minigpt4_{variant}stage1_pretrain.yaml")
    assert cfg.model_cfg.model_type == ("pretrain_llama2" if variant else "pretrain_vicuna0")
    assert cfg.model_cfg.has_qformer is (not variant)
    assert not cfg.model_cfg.prompt_path and cfg.model_cfg.end_sym == "\n" and cfg.model_cfg.max_txt_len == 32
    assert set(cfg.datasets_cfg) == {"laion", "cc_sbu"}
    assert cfg.datasets_cfg.laion.sample_ratio == 115 and cfg.datasets_cfg.cc_sbu.sample_ratio == 14
    for name, shards in (("laion", "{00000..10488}.tar"), ("cc_sbu", "{00000..01255}.tar")):
        ds = cfg.datasets_cfg[name]
        assert ds.batch_size == 64
        assert ds.vis_processor.train.name == "blip2_image_train" and ds.vis_processor.train.image_size == 224
        assert ds.text_processor.train.name == "blip_caption"
        assert ds.data_type == "images" and ds.build_info.storage.endswith(shards)  # from the builder defaults
    run = cfg.run_cfg
    assert (run.task, run.runner, run.lr_sched) == ("image_text_pretrain", "runner_base", "linear_warmup_cosine_lr")
    assert (run.init_lr, run.min_lr, run.warmup_lr, run.weight_decay) == (1e-4, 8e-5, 1e-6, 0.05)
    assert (run.max_epoch, run.iters_per_epoch, run.warmup_steps) == (4, 5000, 5000)
    assert (run.seed, run.amp, run.device, run.accum_grad_iters) == (42, True, "cuda", 1)


@pytest.mark.parametrize("variant", ["", "llama2_"])
def test_stage2(variant):
    cfg = load(f"minigpt4_{variant}stage2_finetune.yaml")
    model = cfg.model_cfg
    assert model.max_txt_len == 160 and model.prompt_path == "prompts/alignment.txt" and model.ckpt
    if variant:
        assert (model.end_sym, model.prompt_template) == ("</s>", "[INST] {} [/INST] ")
    else:
        assert (model.end_sym, model.prompt_template) == ("###", "###Human: {} ###Assistant: ")
    assert set(cfg.datasets_cfg) == {"cc_sbu_align"}
    ds = cfg.datasets_cfg.cc_sbu_align
    assert ds.batch_size == 12 and ds.vis_processor.train.name == "blip2_image_eval"
    assert ds.build_info.storage  # from the builder defaults
    run = cfg.run_cfg
    assert (run.init_lr, run.min_lr, run.warmup_lr, run.weight_decay) == (3e-5, 1e-5, 1e-6, 0.05)
    assert (run.max_epoch, run.iters_per_epoch, run.warmup_steps) == (5, 200, 200)
    assert (run.seed, run.amp, run.task) == (42, True, "image_text_pretrain")


def test_alignment_prompts():
    lines = (REPO / "prompts" / "alignment.txt").read_text().splitlines()
    assert lines == PROMPTS


def test_tiny_cpu_config_is_self_contained(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    cfg = load("minigpt4_tiny_cpu.yaml")
    assert cfg.run_cfg.device == "cpu" and not cfg.run_cfg.amp
    for key in ("vit_ckpt", "q_former_model", "llama_model", "ckpt", "prompt_path"):
        assert (REPO / cfg.model_cfg[key]).exists(), key
    assert set(cfg.datasets_cfg) == {"synthetic_shapes"}
    assert registry.get_builder_class("synthetic_shapes")


def test_options_override_the_yaml():
    cfg = Config(cfg_path=str(CONFIGS / "minigpt4_stage2_finetune.yaml"), options=["run.init_lr=1e-5", "datasets.cc_sbu_align.batch_size=6"])
    assert cfg.run_cfg.init_lr == 1e-5 and cfg.datasets_cfg.cc_sbu_align.batch_size == 6
