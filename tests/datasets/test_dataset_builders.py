"""minigpt4/datasets: builders, the three datasets, and the resumable batch streams."""
from __future__ import annotations

import itertools
import json
import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf

import minigpt4  # noqa: F401  (registers the builders)
from minigpt4.common.registry import registry
from minigpt4.datasets.data_utils import BatchStream, DatasetError, MultiIterLoader, ResumableLoader
from train_fixtures import PROCESSORS, write_align_folder, write_shards


def build(name: str, **section):
    """The train dataset of builder ``name`` from its defaults YAML merged under ``section``."""
    cls = registry.get_builder_class(name)
    defaults = OmegaConf.load(cls.default_config_path("default")).datasets[name]
    return cls(OmegaConf.merge(defaults, section)).build_datasets()["train"]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["answer"] == y["answer"]
        assert torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("name", ["laion", "cc_sbu", "cc_sbu_align", "synthetic_shapes"])
def test_builders_are_registered_with_packaged_defaults(name):
    cls = registry.get_builder_class(name)
    path = cls.default_config_path("default")
    assert path.is_absolute() and path.is_file() and path.parent.name == name
    section = OmegaConf.load(path).datasets[name]
    assert section.data_type == "images" and "build_info" in section
    with pytest.raises(KeyError, match="unknown dataset config type"):
        cls.default_config_path("nope")


def test_shards_give_processed_pairs_and_skip_a_corrupt_sample(tmp_path, caplog):
    pattern = write_shards(tmp_path / "laion", n_shards=2, per_shard=5, corrupt=(3,))
    dataset = build("laion", build_info={"storage": pattern}, **PROCESSORS)
    assert len(dataset.shards) == 2 and dataset.shuffle_buffer == 1000
    loader = ResumableLoader(BatchStream(dataset, batch_size=4, seed=0))
    with caplog.at_level(logging.WARNING):
        batches = take(loader, 6)
    assert batches[0]["image"].shape == (4, 3, 224, 224)
    answers = {a for b in batches for a in b["answer"]}
    assert answers <= {f"a {c} box, on white" for c in ["red", "green", "blue", "yellow", "purple", "orange"]}
    assert loader.broken >= 1  # 24 samples drawn from 10 with replacement of shards: sample 3 was met
    assert "000000003" in caplog.text and "skipping broken sample" in caplog.text


def test_missing_or_empty_shard_storage_names_the_key(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets\.cc_sbu\.build_info\.storage: no such folder '.*nowhere'"):
        build("cc_sbu", build_info={"storage": str(tmp_path / "nowhere" / "{00000..00003}.tar")}, **PROCESSORS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"datasets\.laion\.build_info\.storage: no shard matches"):
        build("laion", build_info={"storage": str(tmp_path / "empty" / "{00000..00003}.tar")}, **PROCESSORS)
    with pytest.raises(DatasetError, match=r"datasets\.laion\.vis_processor\.train\.name: missing"):
        build("laion", build_info={"storage": str(tmp_path / "empty")})


def test_shards_without_webdataset_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as after `pip install -e ".[demo]"`
    with pytest.raises(DatasetError, match=r"datasets\.laion\.build_info\.storage: reading webdataset shards needs the webdataset package"):
        build("laion", build_info={"storage": write_shards(tmp_path / "s", 1, 2)}, **PROCESSORS)


def test_a_folder_of_unreadable_shards_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000.tar").write_bytes(b"not a tar file at all" * 50)
    dataset = build("laion", build_info={"storage": str(tmp_path / "bad")}, **PROCESSORS)
    with pytest.raises(DatasetError, match="held no readable sample"):
        next(ResumableLoader(BatchStream(dataset, batch_size=2, seed=0)))


def test_shards_of_only_unusable_samples_are_an_error_not_a_hang(tmp_path, monkeypatch):
    # Every image corrupt (as, say, every caption under another key): the samples are read, not
    # the shards, and each is skipped; past a bound in a row, the data is refused with the last reason.
    monkeypatch.setattr("minigpt4.datasets.data_utils.BROKEN_IN_A_ROW", 30)
    pattern = write_shards(tmp_path / "laion", n_shards=2, per_shard=4, corrupt=tuple(range(8)))
    dataset = build("laion", build_info={"storage": pattern}, **PROCESSORS)
    with pytest.raises(DatasetError, match=r"datasets\.laion\.build_info\.storage: the last 30 samples could not be used; the last: .*0000000\d"):
        next(ResumableLoader(BatchStream(dataset, batch_size=2, seed=0)))


def test_cc_sbu_align_items(tmp_path):
    folder = write_align_folder(tmp_path / "align", n=4, captions=["The Caption: stays RAW."])
    dataset = build("cc_sbu_align", build_info={"storage": str(folder)}, vis_processor=PROCESSORS["vis_processor"])
    assert len(dataset) == 4
    item = dataset[1]
    assert set(item) == {"image", "answer", "image_id"}
    assert item["image"].shape == (3, 224, 224) and item["image_id"] == "5"
    assert item["answer"] == "The Caption: stays RAW."  # no text processor, as the original


def test_cc_sbu_align_bad_input(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets\.cc_sbu_align\.build_info\.storage: no such folder '.*missing'"):
        build("cc_sbu_align", build_info={"storage": str(tmp_path / "missing")}, **PROCESSORS)
    folder = tmp_path / "empty_ann"
    folder.mkdir()
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match=r"cc_sbu_align\.build_info\.storage: .*filter_cap\.json' holds no annotations"):
        build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "2", "caption": "a box"}, {"image_id": "5", "caption": None}]}))
    with pytest.raises(DatasetError, match=r"filter_cap\.json' annotation 1: the caption must be text, got None"):
        build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)
    (folder / "filter_cap.json").write_text("")
    with pytest.raises(DatasetError, match=r"filter_cap\.json' is not \{\"annotations\""):
        build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)
    (folder / "filter_cap.json").unlink()
    with pytest.raises(DatasetError, match="no annotation file"):
        build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)


def test_undecodable_image_is_replaced_and_counted(tmp_path, caplog):
    folder = write_align_folder(tmp_path / "align", n=5, broken=(2,))
    dataset = build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)
    loader = ResumableLoader(BatchStream(dataset, batch_size=5, seed=0))
    with caplog.at_level(logging.WARNING):
        batch = next(loader)
    assert len(batch["answer"]) == 5 and batch["image"].shape[0] == 5  # the batch keeps its size
    assert "8" not in batch["image_id"]  # image_id of sample 2
    assert loader.broken == 1 and "8.jpg" in caplog.text


def test_map_style_ranks_split_the_doubled_batch(tmp_path):
    folder = write_align_folder(tmp_path / "align", n=7)
    dataset = build("cc_sbu_align", build_info={"storage": str(folder)}, **PROCESSORS)
    single = take(ResumableLoader(BatchStream(dataset, batch_size=4, seed=3)), 5)
    ranks = [take(ResumableLoader(BatchStream(dataset, batch_size=2, seed=3, rank=r, world_size=2)), 5) for r in range(2)]
    for j in range(5):
        assert single[j]["image_id"] == ranks[0][j]["image_id"] + ranks[1][j]["image_id"]
        assert torch.equal(single[j]["image"], torch.cat([ranks[0][j]["image"], ranks[1][j]["image"]]))
    # every sample once per pass, in a new order each pass
    ids = list(itertools.chain.from_iterable(b["image_id"] for b in single))
    assert sorted(ids[:7]) == sorted(ids[7:14]) and ids[:7] != ids[7:14]


@pytest.mark.parametrize("kind", ["shards", "map"])
def test_resumed_loader_continues_exactly(tmp_path, kind):
    if kind == "shards":
        dataset = build("laion", build_info={"storage": write_shards(tmp_path / "s", 3, 4, corrupt=(5,))}, **PROCESSORS)
    else:
        dataset = build("cc_sbu_align", build_info={"storage": str(write_align_folder(tmp_path / "a", 6))}, **PROCESSORS)
    workers = 2  # real DataLoader worker processes, handed out round-robin
    reference = take(ResumableLoader(BatchStream(dataset, 3, seed=1, num_workers=workers), workers), 9)
    first = ResumableLoader(BatchStream(dataset, 3, seed=1, num_workers=workers), workers)
    same_batches(take(first, 5), reference[:5])  # stop after an odd number: resume on worker 1
    state = first.state_dict()
    first.close()
    resumed = ResumableLoader(BatchStream(dataset, 3, seed=1, num_workers=workers), workers)
    resumed.load_state_dict(state)
    same_batches(take(resumed, 4), reference[5:])
    resumed.close()


def test_a_resume_over_other_shards_says_it_reads_other_samples(tmp_path, caplog):
    # Shards added between a run and its resume (a download still going on): the stream draws
    # shards by their position in the list, so the resumed run reads other samples: it says so.
    write_shards(tmp_path / "s", 2, 4)
    before = build("laion", build_info={"storage": str(tmp_path / "s")}, **PROCESSORS)
    first = ResumableLoader(BatchStream(before, 2, seed=1))
    take(first, 2)
    state = first.state_dict()
    assert state["shards"]["count"] == 2
    with caplog.at_level(logging.WARNING):
        ResumableLoader(BatchStream(before, 2, seed=1)).load_state_dict(state)
    assert "not those the checkpoint read" not in caplog.text
    (tmp_path / "s").rename(tmp_path / "moved")  # the same shards in another folder: the same stream
    moved = build("laion", build_info={"storage": str(tmp_path / "moved")}, **PROCESSORS)
    with caplog.at_level(logging.WARNING):
        ResumableLoader(BatchStream(moved, 2, seed=1)).load_state_dict(state)
    assert "not those the checkpoint read" not in caplog.text
    (tmp_path / "moved").rename(tmp_path / "s")
    write_shards(tmp_path / "s", 3, 4)
    after = build("laion", build_info={"storage": str(tmp_path / "s")}, **PROCESSORS)
    with caplog.at_level(logging.WARNING):
        ResumableLoader(BatchStream(after, 2, seed=1)).load_state_dict(state)
    assert "datasets.laion.build_info.storage: the shards are not those the checkpoint read (2 then, 3 now)" in caplog.text


def test_multi_iter_loader_mixes_by_sample_ratio():
    class Counter:
        def __init__(self, name):
            self.name, self.broken = name, 0

        def __next__(self):
            return self.name

    mix = MultiIterLoader([Counter("laion"), Counter("cc_sbu")], [115, 14], seed=0)
    draws = [next(mix) for _ in range(4000)]
    assert draws.count("laion") / len(draws) == pytest.approx(115 / 129, abs=0.02)
    replay = MultiIterLoader([Counter("laion"), Counter("cc_sbu")], [115, 14], seed=0)
    replay.step = 100
    assert [next(replay) for _ in range(50)] == draws[100:150]
    with pytest.raises(DatasetError, match="sample_ratio"):
        MultiIterLoader([Counter("a")], [0])


def test_a_resume_with_the_datasets_in_another_order_is_refused(tmp_path):
    """The mix draws a dataset by its position: the other order would give each dataset the
    other's data position and draws, silently."""
    laion = build("laion", build_info={"storage": write_shards(tmp_path / "laion", 1, 4)}, **PROCESSORS)
    align = build("cc_sbu_align", build_info={"storage": str(write_align_folder(tmp_path / "align", n=4))}, **PROCESSORS)

    def mix(order):
        datasets = {"laion": laion, "cc_sbu_align": align}
        return MultiIterLoader([ResumableLoader(BatchStream(datasets[n], 2, seed=0)) for n in order], [3, 1], seed=0, names=order)

    first = mix(["laion", "cc_sbu_align"])
    take(first, 3)
    state = first.state_dict()
    assert state["names"] == ["laion", "cc_sbu_align"]
    mix(["laion", "cc_sbu_align"]).load_state_dict(state)
    with pytest.raises(DatasetError, match=r"datasets: the checkpoint mixed laion, cc_sbu_align in this order, this config lists cc_sbu_align, laion"):
        mix(["cc_sbu_align", "laion"]).load_state_dict(state)


def test_synthetic_shapes_builder_is_deterministic_and_validates_its_kinds():
    dataset = build("synthetic_shapes", vis_processor={"train": {"name": "blip2_image_eval", "image_size": 64}})
    assert len(dataset) == 100_000
    a, b = dataset.load(7, seed=1), dataset.load(7, seed=1)
    assert torch.equal(a["image"], b["image"]) and a["answer"] == b["answer"]
    assert a["image"].shape == (3, 64, 64) and a["instruction_input"].startswith("<Img><ImageHere></Img> ")
    with pytest.raises(DatasetError, match=r"datasets\.synthetic_shapes\.build_info\.prompt_kinds: unknown \['poems'\]"):
        build("synthetic_shapes", vis_processor={"train": {"name": "blip2_image_eval"}}, build_info={"prompt_kinds": ["poems"]})
