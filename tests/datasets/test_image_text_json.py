"""minigpt4/datasets/builders/image_text_json_builder.py and datasets/image_text_json_dataset.py:
your own folder of images + a JSON Lines file, checked line by line before training."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

import minigpt4  # noqa: F401  (registers the builders)
from minigpt4.common.config import Config
from minigpt4.common.registry import registry
from minigpt4.datasets.data_utils import BatchStream, DatasetError, MultiIterLoader, ResumableLoader
from train_fixtures import write_align_folder

REPO = Path(__file__).resolve().parents[2]
KEY = "datasets.image_text_json.build_info"
EVAL_PROCESSOR = {"vis_processor": {"train": {"name": "blip2_image_eval", "image_size": 224}}}
ALIGNMENT = [line for line in (REPO / "prompts" / "alignment.txt").read_text().splitlines() if line]


def save_image(path: Path, colour: str, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(img).rectangle([6, 6, 30, 30], fill=colour)
    img.save(path, format=fmt)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def build(storage: Path, processors: dict = EVAL_PROCESSOR, **build_info):
    cls = registry.get_builder_class("image_text_json")
    defaults = OmegaConf.load(cls.default_config_path("default")).datasets.image_text_json
    info = {"storage": str(storage), "prompt_path": str(REPO / "prompts" / "alignment.txt"), **build_info}
    section = OmegaConf.merge(defaults, {"build_info": info}, processors)
    return cls(section).build_datasets()["train"]


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Three good images (jpg, png, webp in a subfolder) and every kind of bad line."""
    root = tmp_path / "my_images"
    save_image(root / "a.jpg", "red")
    save_image(root / "b.png", "green")
    save_image(root / "sub" / "c.webp", "blue", "WEBP")
    (root / "corrupt.jpg").write_bytes(b"this text is not a picture")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "yellow").save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    write_jsonl(root / "annotations.jsonl", [
        {"image": "a.jpg", "answer": "A red box on white."},                                             # 1 ok
        {"image": "b.png", "answer": "Green.", "instruction": "What colour is the box?", "id": "x"},      # 2 ok
        {"image": "sub/c.webp", "answer": "One.", "instruction": "<Img><ImageHere></Img> Count the boxes."},  # 3 ok
        '{"image": "a.jpg", "answer": ',                                                                 # 4 malformed
        {"image": "b.png", "answer": "   "},                                                             # 5 empty answer
        {"image": "missing.jpg", "answer": "Nothing."},                                                  # 6 missing image
        {"image": "corrupt.jpg", "answer": "Broken."},                                                   # 7 unreadable
        {"image": "a.jpg", "answer": "The same picture again."},                                         # 8 duplicate image
        {"image": "sub/c.webp"},                                                                         # 9 missing key
        {"image": "b.png", "answer": "Another.", "id": "x"},                                             # 10 duplicate id
        "",                                                                                              # 11 blank: ignored
        {"image": "truncated.jpg", "answer": "Half a file."},                                            # 12 truncated
        {"image": "b.png", "answer": "A square.", "instruction": "What shape is it?"},                    # 13 ok: another question
        {"image": None, "answer": "No picture."},                                                        # 14 no image
    ])
    return root


def test_registered_with_packaged_defaults():
    cls = registry.get_builder_class("image_text_json")
    section = OmegaConf.load(cls.default_config_path("default")).datasets.image_text_json
    assert section.data_type == "images" and section.build_info.strict is False and section.build_info.ann_path is None


def test_bad_lines_are_reported_with_file_and_line_and_skipped(messy_folder, caplog):
    ann = messy_folder / "annotations.jsonl"
    with caplog.at_level(logging.WARNING):
        dataset = build(messy_folder)
    assert [r.line for r in dataset.records] == [1, 2, 3, 13]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary, not one warning per line
    text = warnings[0].getMessage()
    assert f"{KEY}.ann_path: skipping 9 of 13 lines of {ann}" in text
    expected = {
        4: "not valid JSON",
        5: "'answer' is empty",
        6: "image 'missing.jpg': no such file",
        7: "image 'corrupt.jpg': not an image",
        8: "duplicate image 'a.jpg' (first on line 1)",
        9: "missing key 'answer'",
        10: "duplicate id 'x' (first on line 2)",
        12: "image 'truncated.jpg': damaged image file",
        14: "'image' is empty",
    }
    for line, reason in expected.items():
        assert f"{ann}:{line}: {reason}" in text, (line, text)


def test_items_and_instructions(messy_folder):
    dataset = build(messy_folder)
    items = [dataset.load(i, seed=i) for i in range(len(dataset))]
    assert all(item["image"].shape == (3, 224, 224) for item in items)
    assert [item["answer"] for item in items] == ["A red box on white.", "Green.", "One.", "A square."]
    assert [item["image_id"] for item in items] == ["a.jpg", "x", "sub/c.webp", "b.png"]
    # some lines have an instruction: every item carries one, so a batch stays uniform
    assert items[0]["instruction_input"] in ALIGNMENT  # no instruction: a prompt of the fallback list
    assert items[1]["instruction_input"] == "<Img><ImageHere></Img> What colour is the box?"
    assert items[2]["instruction_input"] == "<Img><ImageHere></Img> Count the boxes."  # already placed: unchanged
    assert dataset.load(0, seed=5)["instruction_input"] == dataset.load(0, seed=5)["instruction_input"]


def test_without_instructions_the_model_prompt_list_applies(tmp_path):
    root = tmp_path / "plain"
    save_image(root / "a.jpg", "red")
    write_jsonl(root / "captions.jsonl", [{"image": "a.jpg", "answer": "A red box."}])
    dataset = build(root, ann_path=str(root / "captions.jsonl"))
    assert "instruction_input" not in dataset.load(0, seed=0)
    assert len(build(root, ann_path="captions.jsonl")) == 1  # relative to the image folder


def test_strict_mode_fails_before_training(messy_folder):
    with pytest.raises(DatasetError) as err:
        build(messy_folder, strict=True)
    message = str(err.value)
    assert message.startswith(f"{KEY}.ann_path: 9 of 13 lines refused")
    assert f"{messy_folder / 'annotations.jsonl'}:7: image 'corrupt.jpg'" in message and f"{KEY}.strict" in message


def test_unusable_input_names_the_key(tmp_path):
    with pytest.raises(DatasetError, match=rf"{KEY}\.storage: no such folder"):
        build(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=rf"{KEY}\.ann_path: no such file .*annotations\.jsonl"):
        build(tmp_path / "empty")
    write_jsonl(tmp_path / "empty" / "annotations.jsonl", [{"image": "gone.jpg", "answer": "x"}, "[1, 2]"])
    with pytest.raises(DatasetError, match=rf"(?s){KEY}\.ann_path: no usable line.*:1: image 'gone.jpg'.*:2: expected a JSON object"):
        build(tmp_path / "empty")


def test_mixed_by_sample_ratio_with_cc_sbu_align_and_trains_the_tiny_model(messy_folder, tmp_path, tiny_models):
    own = build(messy_folder)
    align_cls = registry.get_builder_class("cc_sbu_align")
    align_dir = write_align_folder(tmp_path / "align", n=4)
    align = align_cls(OmegaConf.create({"build_info": {"storage": str(align_dir)}, **EVAL_PROCESSOR})).build_datasets()["train"]
    loaders = [ResumableLoader(BatchStream(d, batch_size=2, seed=0)) for d in (own, align)]
    mix = MultiIterLoader(loaders, ratios=[3, 1], seed=0)
    batches = [next(mix) for _ in range(12)]
    own_batches = [b for b in batches if "instruction_input" in b]
    assert 0 < len(own_batches) < 12 and loaders[0].batches == len(own_batches)
    loss = tiny_models["vicuna0"](own_batches[0])["loss"]
    assert torch.isfinite(loss)


def test_finetune_config_needs_only_the_folder(tmp_path):
    cfg = Config(
        cfg_path=str(REPO / "train_configs" / "minigpt4_finetune_own_data.yaml"),
        options=[f"datasets.image_text_json.build_info.storage={tmp_path}"],
    )
    model = cfg.model_cfg
    assert (model.model_type, model.end_sym, model.max_txt_len) == ("pretrain_vicuna0", "###", 160)
    assert (model.prompt_path, model.prompt_template) == ("prompts/alignment.txt", "###Human: {} ###Assistant: ")
    assert model.ckpt  # the released checkpoint, as in eval_configs/minigpt4_eval.yaml
    ds = cfg.datasets_cfg.image_text_json
    assert ds.build_info.storage == str(tmp_path) and ds.build_info.ann_path is None and ds.build_info.strict is False
    assert ds.vis_processor.train.name == "blip2_image_eval" and set(cfg.datasets_cfg) == {"image_text_json"}
    assert (cfg.run_cfg.init_lr, cfg.run_cfg.min_lr, cfg.run_cfg.max_epoch) == (3e-5, 1e-5, 5)
