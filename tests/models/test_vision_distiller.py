"""Nano stage 0b: restyled scenes, and the student that learns to see them as the teacher sees its own."""
from __future__ import annotations

import colorsys
import random

import pytest
import torch

from conftest import REF
from minigpt4.common.utils import LIBRARY_ROOT
from minigpt4.common.config import Config, ConfigError
from minigpt4.common.registry import registry
from minigpt4.datasets.data_utils import collate
from minigpt4.datasets.datasets.synthetic_shapes import (
    COLOURS,
    HUE_BANDS,
    KIND_COLOUR_CLASSES,
    NO_PLACE,
    PAIRS,
    PLACES,
    RESTYLE_SIZES,
    SHAPES,
    Shape,
    SyntheticShapesDataset,
    restyled_shade,
    scene_kinds,
    scene_places,
    scene_slots,
)
from minigpt4.models import MiniGPT4, VisionDistiller
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

VISION = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")


def test_restyled_shades_stay_in_their_colour_band():
    rng = random.Random(0)
    for colour in COLOURS:
        (lo, hi), sats, vals = HUE_BANDS[colour]
        for _ in range(200):
            h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in restyled_shade(colour, rng)))
            hue = h * 360 if h * 360 <= hi + 1 else h * 360 - 360  # red's band wraps around 0
            assert lo - 1 <= hue <= hi + 1 and sats[0] - 0.01 <= s and vals[0] - 0.01 <= v, (colour, hue, s, v)


def test_restyle_gives_the_teacher_the_training_drawing_of_the_same_layout():
    plain = SyntheticShapesDataset(lambda image: image, seed=3)
    assert "teacher_image" not in plain.load(0, seed=0)  # restyle 0: the scenes and items of before
    data = SyntheticShapesDataset(lambda image: image, seed=3, restyle=1.0)
    scene, image, teacher = data.restyled_scene(5)
    again = data.restyled_scene(5)
    assert again[0] == scene and list(again[1].getdata()) == list(image.getdata())  # a pure function of (seed, index)
    assert list(image.getdata()) != list(teacher.getdata())
    sizes = [s.size for i in range(50) for s in data.restyled_scene(i)[0]]
    assert RESTYLE_SIZES[0] <= min(sizes) < 0.2 and 0.4 < max(sizes) <= RESTYLE_SIZES[1]
    item = data.load(5, seed=0)
    assert set(item) >= {"image", "teacher_image", "slots", "places"} and item["slots"].tolist() == scene_slots(scene)
    # the place target says what a "where" answer says, slot by slot from left to right
    assert [PLACES[p] for p in item["places"].tolist() if p != NO_PLACE] == [s.place for s in scene]
    assert item["places"].tolist() == scene_places(scene) and len(scene_places(scene)) == 3
    with pytest.raises(ValueError, match="restyle: a probability"):
        SyntheticShapesDataset(lambda image: image, restyle=1.5)


SMALL = ["model.vit_config.depth=1", "model.qformer_config.num_hidden_layers=1", "model.num_query_token=4"]


def nano_cfg(write_yaml, arch: str, small: bool = False, **model):
    cfg = {"model": {"arch": arch, "model_type": "nano", **model}, "run": {"task": "image_text_pretrain"}}
    return Config(cfg_path=str(write_yaml(cfg)), options=SMALL if small else []).model_cfg


def test_the_student_starts_as_the_teacher_learns_to_match_it_and_loads_into_minigpt4(write_yaml, tmp_path):
    # The shipped vision side: an untrained one gives nearly the same outputs for every picture.
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    torch.manual_seed(0)
    model = VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path)))
    assert not any(k.startswith("teacher") for k in model.state_dict())  # the teacher is never saved
    assert all(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in model.teacher.parameters())
    data = SyntheticShapesDataset(Blip2ImageEvalProcessor(64), seed=1, restyle=1.0)
    batch = collate([data.load(i, seed=i) for i in range(8)])
    model.train()
    assert not model.training  # dropout off: the student learns the teacher's deterministic outputs
    with torch.no_grad():  # the same picture for both: the copy matches exactly
        assert model({"image": batch["teacher_image"], "teacher_image": batch["teacher_image"]})["loss"].item() < 1e-10
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    # A small step: the student starts at the teacher, a large one throws it far off first.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(20):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1e-3 and losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    # The student's keys are MiniGPT-4's: its checkpoint replaces the vision side of the full model.
    student = tmp_path / "student.pth"
    torch.save({"model": model.state_dict()}, student)
    full = MiniGPT4.from_config(nano_cfg(write_yaml, "mini_gpt4", llama_model=str(REF / "llama"), pad_token="$$", lora_r=0, ckpt=str(student)))
    assert torch.equal(full.query_tokens, model.query_tokens)
    assert torch.equal(full.Qformer.state_dict()["encoder.layer.0.attention.attention.query.weight"], model.Qformer.state_dict()["encoder.layer.0.attention.attention.query.weight"])
    with pytest.raises(KeyError, match="restyle > 0"):
        model({"image": batch["image"]})


def test_the_distiller_needs_weights_to_copy(write_yaml):
    with pytest.raises(ConfigError, match="model.ckpt: the vision distiller needs the trained vision side"):
        VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", small=True))


def test_the_place_head_learns_where_the_shapes_are_while_the_mse_holds_the_rest(write_yaml):
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    torch.manual_seed(0)
    model = VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), place_weight=1.0))
    assert model.place_head.out_features == 3 * (len(PLACES) + 1)
    data = SyntheticShapesDataset(Blip2ImageEvalProcessor(64), seed=1, restyle=0.5)
    batch = collate([data.load(i, seed=i) for i in range(32)])

    def place_loss_and_mse():
        with torch.no_grad():
            queries = model.queries(batch["image"])
            logits = model.place_head(queries.flatten(1)).view(-1, len(PLACES) + 1)
            mse = torch.nn.functional.mse_loss(queries, model.teacher(batch["teacher_image"]))
            return torch.nn.functional.cross_entropy(logits, batch["places"].flatten()).item(), mse.item()

    place_before, mse_before = place_loss_and_mse()
    with torch.no_grad():  # the loss is the MSE plus the weighted place loss
        assert model(batch)["loss"].item() == pytest.approx(mse_before + place_before, rel=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(30):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    place_after, mse_after = place_loss_and_mse()
    assert place_after < 0.5 * place_before, (place_before, place_after)
    assert mse_after < 2 * mse_before + 0.02, (mse_before, mse_after)
    # The head stays behind when the student's weights load into MiniGPT-4 (an unexpected key).
    assert any(k.startswith("place_head.") for k in model.state_dict())
    with pytest.raises(ValueError, match=r"samples\['places'\]: 2 slots per scene, the heads have 3"):
        model({**batch, "places": batch["places"][:, :2]})


def train_with_warmup(model, batch, steps: int = 40) -> None:
    """AdamW on one batch with a warm-up, as the configs': at full rate a new head's first gradients
    throw the outputs far off."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.03, total_iters=20)
    for _ in range(steps):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()


def test_the_token_head_reads_each_slot_from_its_own_query_token(write_yaml):
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    torch.manual_seed(0)
    model = VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), token_weight=1.0))
    assert not hasattr(model, "place_head") and model.token_head.in_features == model.Qformer.config.hidden_size
    data = SyntheticShapesDataset(Blip2ImageEvalProcessor(64), seed=1, restyle=0.5)
    batch = collate([data.load(i, seed=i) for i in range(32)])

    def token_loss_and_mse():
        with torch.no_grad():
            queries = model.queries(batch["image"])
            out = model.token_head(queries[:, :3])  # token i -> slot i, one head for all three
            pair, place = out[..., : len(PAIRS) + 1], out[..., len(PAIRS) + 1 :]
            ce = torch.nn.functional.cross_entropy
            token = ce(pair.flatten(0, 1), batch["slots"].flatten()) + ce(place.flatten(0, 1), batch["places"].flatten())
            return token.item(), torch.nn.functional.mse_loss(queries, model.teacher(batch["teacher_image"])).item()

    token_before, mse_before = token_loss_and_mse()
    with torch.no_grad():
        assert model(batch)["loss"].item() == pytest.approx(mse_before + token_before, rel=1e-4)
    train_with_warmup(model, batch)
    token_after, _ = token_loss_and_mse()
    assert token_after < 0.5 * token_before, (token_before, token_after)
    # How far the outputs move is the MSE's to hold over a run (stage 0d: 0.05 after 250 of 1,500
    # iterations, a twenty-fifth of their variance), not over 40 steps on one batch.
    with pytest.raises(ValueError, match=r"samples\['slots'\]: 2 slots per scene, the heads have 3"):
        model({**batch, "slots": batch["slots"][:, :2]})


def test_the_kind_head_reads_each_shape_kind_from_its_own_query_token(write_yaml):
    # the targets: per kind its colour and third, or absent / several
    scene = [Shape("red", "circle", 0.2, 0.5, 0.2), Shape("blue", "square", 0.5, 0.5, 0.2), Shape("green", "square", 0.8, 0.5, 0.2)]
    assert scene_kinds(scene) == ([list(COLOURS).index("red"), len(COLOURS) + 1, len(COLOURS)], [0, len(PLACES) + 1, len(PLACES)])
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    torch.manual_seed(0)
    model = VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), token_weight=1.0, kind_weight=1.0))
    data = SyntheticShapesDataset(Blip2ImageEvalProcessor(64), seed=1, restyle=0.5)
    batch = collate([data.load(i, seed=i) for i in range(32)])
    assert batch["kind_colours"].shape == batch["kind_places"].shape == (32, len(SHAPES))

    def kind_loss():
        with torch.no_grad():
            out = model.kind_head(model.queries(batch["image"])[:, 3:6])  # token 3 + k -> kind k, one head for all three
            colour, place = out[..., :KIND_COLOUR_CLASSES], out[..., KIND_COLOUR_CLASSES:]
            ce = torch.nn.functional.cross_entropy
            return (ce(colour.flatten(0, 1), batch["kind_colours"].flatten()) + ce(place.flatten(0, 1), batch["kind_places"].flatten())).item()

    before = kind_loss()
    with torch.no_grad():  # the kind loss, weighted, adds to the rest
        model.kind_weight = 0.0
        rest = model(batch)["loss"].item()
        model.kind_weight = 2.0
        assert model(batch)["loss"].item() == pytest.approx(rest + 2.0 * before, rel=1e-4)
        model.kind_weight = 1.0
    train_with_warmup(model, batch)
    assert kind_loss() < 0.5 * before, (before, kind_loss())
    with pytest.raises(KeyError, match=r"samples\['kind_places'\]: the kind head's targets"):
        model({k: v for k, v in batch.items() if k != "kind_places"})
    with pytest.raises(ConfigError, match=r"model.num_query_token: the kind head reads shape kind k from query token 3 \+ k"):
        VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), kind_weight=1.0, num_query_token=5))


def test_the_token_head_needs_a_query_token_per_slot(write_yaml):
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    with pytest.raises(ConfigError, match="model.num_query_token: the token head reads slot i from query token i"):
        VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), token_weight=1.0, num_query_token=2))


@pytest.mark.parametrize("key", ["place_weight", "token_weight", "kind_weight"])
def test_a_negative_head_weight_is_refused(write_yaml, key):
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    with pytest.raises(ConfigError, match=f"model.{key}: a weight >= 0"):
        VisionDistiller.from_config(nano_cfg(write_yaml, "vision_distiller", ckpt=str(path), **{key: -1.0}))


@pytest.mark.parametrize("arch, name", [("scene_classifier", "scene classifier"), ("vision_distiller", "vision distiller")])
@pytest.mark.parametrize(
    "setting, message",
    [({"has_qformer": False}, "model.has_qformer: the {} trains a Q-Former"), ({"vit_precision": "bf16"}, "model.vit_precision: the {} trains the ViT")],
)
def test_the_vision_stages_refuse_a_vision_side_they_cannot_train(write_yaml, arch, name, setting, message):
    cls = registry.get_model_class(arch)
    path = LIBRARY_ROOT / "weights" / "minigpt4_nano.pth"
    with pytest.raises(ConfigError, match=message.format(name)):
        cls.from_config(nano_cfg(write_yaml, arch, small=True, ckpt=str(path), **setting))


@pytest.mark.parametrize("name, heads", [("minigpt4_nano_stage0c.yaml", {"place_head"}), ("minigpt4_nano_stage0d.yaml", {"place_head", "token_head"})])
def test_the_vision_stage_configs_build_their_heads_on_the_shipped_weights(name, heads):
    cfg = Config(cfg_path=str(LIBRARY_ROOT.parent / "train_configs" / name), options=[])
    model = VisionDistiller.from_config(cfg.model_cfg)
    assert {n for n in ("place_head", "token_head") if hasattr(model, n)} == heads
    assert cfg.run_cfg.warmup_steps > 0  # a new head's first gradients would throw the outputs far off
