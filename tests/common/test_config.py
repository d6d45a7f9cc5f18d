from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import tiny_model_section
from minigpt4.common.config import Config, ConfigError


NANO = {"model": {"arch": "mini_gpt4", "model_type": "nano"}}


def shapes(**section) -> dict:
    return {**NANO, "datasets": {"synthetic_shapes": {"batch_size": 8, **section}}}


def load(write_yaml, cfg, options=None):
    return Config(cfg_path=str(write_yaml(cfg)), options=options)


def test_user_yaml_is_merged_over_the_model_type_defaults(write_yaml):
    cfg = load(write_yaml, {"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0", "llama_model": "/x", "max_txt_len": 160}})
    m = cfg.model_cfg
    assert m.max_txt_len == 160 and m.llama_model == "/x"
    assert m.num_query_token == 32 and m.vit_precision == "fp16" and m.has_qformer  # from minigpt4_vicuna0.yaml
    assert m.q_former_model.endswith("blip2_pretrained_flant5xxl.pth")
    assert cfg.preprocess_cfg.vis_processor.eval.name == "blip2_image_eval"
    assert cfg.run_cfg.lr_sched == "linear_warmup_cosine_lr"  # run defaults
    llama2 = load(write_yaml, {"model": {"arch": "minigpt4", "model_type": "pretrain_llama2"}})
    assert llama2.model_cfg.has_qformer is False


def test_options_override_with_dotlist(write_yaml):
    cfg = load(write_yaml, {"model": tiny_model_section()}, ["model.max_txt_len=77", "run.init_lr=3e-5", "model.end_sym='###'"])
    assert cfg.model_cfg.max_txt_len == 77 and cfg.run_cfg.init_lr == 3e-5 and cfg.model_cfg.end_sym == "###"


def test_to_dict_is_plain_and_round_trips(write_yaml):
    cfg = load(write_yaml, {"model": tiny_model_section()})
    d = cfg.to_dict()
    assert isinstance(d, dict) and d["model"]["num_query_token"] == 4
    assert OmegaConf.create(d).model.vit_config.embed_dim == 48


@pytest.mark.parametrize(
    "cfg,options,message",
    [
        ({"model": {"arch": "mini_gpt5", "model_type": "pretrain_vicuna0"}}, None, r"model\.arch: unknown model 'mini_gpt5'; known: mini_gpt4"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna13"}}, None, r"model\.model_type: unknown 'pretrain_vicuna13'.*known: nano, pretrain_llama2, pretrain_vicuna0"),
        ({"model": {"arch": "mini_gpt4"}}, None, r"model\.model_type: missing"),
        ({"model": {"model_type": "pretrain_vicuna0"}}, None, r"model\.arch: missing"),
        ({"run": {}}, None, r"model: missing section"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0", "max_txt_len": "long"}}, None, r"model\.max_txt_len: .*long"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0", "max_txt_lenn": 3}}, None, r"model\.max_txt_lenn: unknown key"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0"}, "run": {"init_lr": "fast"}}, None, r"run\.init_lr: .*fast"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0"}, "datasets": {"no_such_set": {}}}, None, r"datasets\.no_such_set: unknown builder"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0"}, "trainig": {}}, None, r"trainig: unknown section"),
        ({"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna0"}}, ["model.max_txt_len"], r"--options: 'model.max_txt_len' is not of the form key=value"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "generation": {"temprature": 0.7}}, None, r"generation\.temprature: unknown key"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano", "attn_implementation": "flash"}}, None, r"model\.attn_implementation: 'flash' is not one of sdpa, eager"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano", "vit_precision": "fp8"}}, None, r"model\.vit_precision: 'fp8' is not one of fp16, bf16, fp32"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano", "torch_dtype": "half"}}, None, r"model\.torch_dtype: 'half' is not one of"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "run": {"amp_dtype": "fp8"}}, None, r"run\.amp_dtype: 'fp8' is not one of"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "run": {"accum_grad_iters": 0}}, None, r"run\.accum_grad_iters: must be at least 1, got 0"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "run": {"save_every_iters": 0}}, None, r"run\.save_every_iters: must be at least 1"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "run": {"accum_grad_iters": 2, "save_every_iters": 3}}, None, r"run\.save_every_iters: 3 must be a multiple of run\.accum_grad_iters \(2\)"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "generation": {"max_new_tokens": 0}}, None, r"generation\.max_new_tokens: must be at least 1"),
        ({"model": {"arch": "mini_gpt4", "model_type": "nano"}, "generation": {"temperature": 0}}, None, r"generation\.temperature must be > 0.*greedy: do_sample: False"),
        # --options values YAML cannot read, or reads as null: the key, the value, and how to quote it
        (NANO, ["model.prompt_template=[INST] {} [/INST] "], r"--options: model\.prompt_template: the value '\[INST\] \{\} \[/INST\] ' is not valid YAML .*quote it to mean the text: model\.prompt_template='\[INST\] \{\} \[/INST\] '"),
        (NANO, ["model.end_sym=###"], r"--options: model\.end_sym: the value '###' reads as YAML's null \('#' starts a comment\); quote it"),
        # sections: a list where a mapping belongs
        ({**NANO, "datasets": ["synthetic_shapes"]}, None, r"datasets: must be a mapping of keys to values"),
        # a dataset section's misspelled keys are refused, not read past
        (shapes(batch_szie=4), None, r"datasets\.synthetic_shapes\.batch_szie: unknown key \(known keys: type, data_type, batch_size"),
        (shapes(build_info={"restlye": 0.5}), None, r"datasets\.synthetic_shapes\.build_info\.restlye: unknown key \(known keys: num_samples, .*restyle"),
        (shapes(type="big"), None, r"datasets\.synthetic_shapes\.type: unknown dataset config type 'big' for synthetic_shapes; known: default"),
        (shapes(batch_size=2.5), None, r"datasets\.synthetic_shapes\.batch_size: expected a whole number of at least 1 \(per GPU\), got 2\.5"),
        (shapes(batch_size=-2), None, r"datasets\.synthetic_shapes\.batch_size: expected a whole number of at least 1"),
        (shapes(sample_ratio=0), None, r"datasets\.synthetic_shapes\.sample_ratio: expected a number above 0, got 0"),
        ({**NANO, "run": {"num_workers": -1}}, None, r"run\.num_workers: must be 0 \(load in the training process\) or more, got -1"),
        ({**NANO, "run": {"device": "gpu"}}, None, r"run\.device: 'gpu' is not a device \(e\.g\. cuda, cuda:1, cpu\)"),
    ],
)
def test_bad_configs_fail_at_load_with_the_key_path(write_yaml, cfg, options, message):
    with pytest.raises(ConfigError, match=message):
        load(write_yaml, cfg, options)


def test_sections_whose_keys_are_all_commented_out_are_empty(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  arch: mini_gpt4\n  model_type: nano\nrun:\n  # init_lr: 1e-4\ngeneration:\nenv:\ndatasets:\n  synthetic_shapes:\n")
    cfg = Config(cfg_path=str(path))
    assert cfg.run_cfg.init_lr == 1e-4 and cfg.config.generation.max_new_tokens > 0
    assert cfg.config.datasets.synthetic_shapes.build_info.num_samples == 100000


def test_a_dataset_processor_with_a_misspelled_key_is_named_by_its_path(write_yaml):
    from minigpt4.datasets.builders import SyntheticShapesBuilder
    from minigpt4.datasets.data_utils import DatasetError

    cfg = load(write_yaml, shapes(vis_processor={"train": {"name": "blip2_image_train", "image_sise": 64}}))
    with pytest.raises(DatasetError, match=r"datasets\.synthetic_shapes\.vis_processor\.train: .*image_sise"):
        SyntheticShapesBuilder(cfg.config.datasets.synthetic_shapes).build_processors()


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="--cfg-path: no such file"):
        Config(cfg_path=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config(cfg_path=str(bad))


def test_decoding_defaults_come_from_the_config(write_yaml):
    # the original demo's sampling for Vicuna; the nano model type decodes greedily
    vicuna = load(write_yaml, {"model": tiny_model_section()}).generation_cfg
    assert (vicuna.do_sample, vicuna.top_p, vicuna.temperature, vicuna.max_new_tokens, vicuna.num_beams) == (True, 0.9, 1.0, 300, 1)
    nano = load(write_yaml, {"model": {"arch": "mini_gpt4", "model_type": "nano"}}).generation_cfg
    assert nano.do_sample is False and nano.max_new_tokens == 100
    mine = load(write_yaml, {"model": {"arch": "mini_gpt4", "model_type": "nano"}, "generation": {"do_sample": True, "temperature": 0.3}})
    assert mine.generation_cfg.do_sample is True and mine.generation_cfg.temperature == 0.3


def test_keys_of_the_originals_configs_that_do_nothing_here_are_named_in_one_warning(write_yaml, caplog):
    original = {"model": {"arch": "mini_gpt4", "model_type": "nano", "vit_model": "eva_clip_g"},
                "run": {"evaluate": False, "train_splits": ["train"], "gpu": 0}}
    with caplog.at_level("WARNING", logger="minigpt4.common.config"):
        load(write_yaml, original)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "model.vit_model, run.evaluate, run.train_splits, run.gpu" in warnings[0] and "not used" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="minigpt4.common.config"):
        load(write_yaml, {"model": {"arch": "mini_gpt4", "model_type": "nano"}})
    assert not caplog.records


def test_from_config_reads_the_defaults_written_once_in_model_config():
    from minigpt4.common.config import ModelConfig, model_config

    cfg = model_config({"llama_model": "/x"})
    assert cfg.max_txt_len == ModelConfig.max_txt_len and cfg.pad_token == "$$" and cfg.attn_implementation == "sdpa"
    assert model_config(cfg) is cfg  # a validated section passes through
    with pytest.raises(ConfigError, match=r"model\.num_query_token: must be at least 1, got 0"):
        model_config({"num_query_token": 0})
