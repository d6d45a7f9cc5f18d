"""``run.feature_cache`` (frozen vision features read from disk) and ``run.compile`` in real training runs."""
from __future__ import annotations

import json

import pytest
import torch

from minigpt4.common.config import ConfigError
from minigpt4.common.feature_cache import FeatureCache, image_key
from train_fixtures import stage2_config


def run(train, write_yaml, cfg):
    return train.main(["--cfg-path", str(write_yaml(cfg))])


def losses(runner):
    return torch.tensor([h["loss"] for h in runner.history])


def test_image_key_is_the_content():
    image = torch.rand(3, 8, 8)
    assert image_key(image) == image_key(image.clone())
    changed = image.clone()
    changed[0, 0, 0] += 1e-3
    assert image_key(changed) != image_key(image)
    assert image_key(image.double()) != image_key(image)  # the dtype is part of the content
    assert image_key(image.reshape(3, 4, 16)) != image_key(image)


def test_cached_training_equals_uncached_and_reads_every_image_after_the_first_pass(train, write_yaml, align_dir, tmp_path):
    # 6 images, 2 epochs x 2 iterations x 3 = every image twice
    settings = dict(batch_size=3, max_epoch=2, iters_per_epoch=2)
    plain = run(train, write_yaml, stage2_config(align_dir, tmp_path / "plain", **settings))
    cache_dir = tmp_path / "features"
    cached = run(train, write_yaml, stage2_config(align_dir, tmp_path / "cached", feature_cache=str(cache_dir), **settings))

    torch.testing.assert_close(losses(cached), losses(plain), rtol=1e-5, atol=1e-6)
    cache = cached.feature_cache
    assert (cache.misses, cache.hits) == (6, 6)
    entries = sorted(cache_dir.glob("*/*.pt"))
    assert len(entries) == 6 and not list(cache_dir.rglob("*.tmp"))
    feature = torch.load(entries[0], weights_only=True)
    assert feature.shape == (cached.unwrap_model().query_tokens.shape[1], cached.unwrap_model().llama_proj.in_features)
    epochs = [json.loads(line) for line in (tmp_path / "cached" / "job" / "log.txt").read_text().splitlines() if "train_loss" in line]
    assert [e["train_feature_cache_hits"] for e in epochs] == [0, 6]

    # A new run on the same folder computes nothing, and trains the same.
    again = run(train, write_yaml, stage2_config(align_dir, tmp_path / "again", feature_cache=str(cache_dir), **settings))
    assert (again.feature_cache.misses, again.feature_cache.hits) == (0, 12)
    torch.testing.assert_close(losses(again), losses(plain), rtol=1e-5, atol=1e-6)


def test_a_cache_of_other_vision_weights_is_refused(train, write_yaml, align_dir, tmp_path):
    cache_dir = tmp_path / "features"
    FeatureCache(cache_dir, fingerprint="made-by-other-weights")
    with pytest.raises(ConfigError, match=r"run\.feature_cache: .*features.* other vision weights"):
        run(train, write_yaml, stage2_config(align_dir, tmp_path / "out", feature_cache=str(cache_dir), max_epoch=1, iters_per_epoch=1))


def test_random_augmentation_and_a_training_vit_are_refused(train, write_yaml, align_dir, tmp_path):
    cfg = stage2_config(align_dir, tmp_path / "out", feature_cache=str(tmp_path / "features"), max_epoch=1, iters_per_epoch=1)
    cfg["datasets"]["cc_sbu_align"]["vis_processor"]["train"]["name"] = "blip2_image_train"
    with pytest.raises(ConfigError, match=r"datasets\.cc_sbu_align\.vis_processor\.train \(Blip2ImageTrainProcessor\) augments at random"):
        run(train, write_yaml, cfg)

    cfg = stage2_config(align_dir, tmp_path / "out", feature_cache=str(tmp_path / "features"), max_epoch=1, iters_per_epoch=1)
    cfg["model"]["freeze_vit"] = False
    with pytest.raises(ConfigError, match=r"run\.feature_cache: the ViT or Q-Former trains"):
        run(train, write_yaml, cfg)


@pytest.mark.e2e  # torch.compile on a CPU: over a minute on 2 cores
def test_compiled_blocks_train_as_eager(train, write_yaml, align_dir, tmp_path):
    settings = dict(batch_size=3, max_epoch=1, iters_per_epoch=3)
    eager = run(train, write_yaml, stage2_config(align_dir, tmp_path / "eager", **settings))
    compiled = run(train, write_yaml, stage2_config(align_dir, tmp_path / "compiled", compile=True, **settings))
    model = compiled.unwrap_model()
    assert all(layer._compiled_call_impl is not None for layer in model.llama_model.get_decoder().layers)
    assert all(block._compiled_call_impl is not None for block in model.visual_encoder.blocks)
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-4, atol=1e-5)
    # checkpoints keep the plain parameter names
    ckpt = torch.load(tmp_path / "compiled" / "job" / "checkpoint_0.pth", weights_only=True)
    assert set(ckpt["model"]) == {"llama_proj.weight", "llama_proj.bias"}
