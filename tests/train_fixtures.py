"""Builders of small training data on disk: webdataset shards and cc_sbu_align folders.

Imported by the dataset, runner and end-to-end tests (``tests/`` is on ``sys.path`` through
its conftest).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from conftest import REF, tiny_model_section

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def jpeg_bytes(i: int, size: int = 64) -> bytes:
    img = Image.new("RGB", (size + 8 * (i % 3), size), "white")
    ImageDraw.Draw(img).rectangle([4 + i % 7, 6, 30 + 2 * (i % 5), 40], fill=COLOURS[i % len(COLOURS)])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, first: int, count: int, corrupt: tuple[int, ...] = ()) -> Path:
    """A webdataset shard as img2dataset writes it: ``<key>.jpg`` + ``<key>.json`` (+ ``.txt``).

    Samples whose number is in ``corrupt`` get bytes that are not an image.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            key = f"{i:09d}"
            jpg = b"this is not a jpeg" if i in corrupt else jpeg_bytes(i)
            caption = f"A {COLOURS[i % len(COLOURS)].upper()} box, on white!"
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())
            _add(tar, f"{key}.txt", caption.encode())
    return path


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 6, corrupt: tuple[int, ...] = ()) -> str:
    """Shards ``00000.tar``...; returns the brace pattern the configs use."""
    for s in range(n_shards):
        write_shard(folder / f"{s:05d}.tar", s * per_shard, per_shard, corrupt)
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def write_align_folder(folder: Path, n: int = 8, captions: list[str] | None = None, broken: tuple[int, ...] = ()) -> Path:
    """A cc_sbu_align folder: ``filter_cap.json`` and ``image/<id>.jpg``; ``broken`` ids are not images."""
    (folder / "image").mkdir(parents=True, exist_ok=True)
    anns = []
    for i in range(n):
        image_id = str(2 + 3 * i)
        data = b"\xff\xd8 truncated" if i in broken else jpeg_bytes(i)
        (folder / "image" / f"{image_id}.jpg").write_bytes(data)
        caption = captions[i % len(captions)] if captions else f"The image shows a {COLOURS[i % len(COLOURS)]} box on a white background."
        anns.append({"image_id": image_id, "caption": caption})
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    return folder


PROCESSORS = {
    "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 224}},
    "text_processor": {"train": {"name": "blip_caption"}},
}


def run_section(output_dir: Path, **overrides) -> dict:
    run = {
        "task": "image_text_pretrain",
        "lr_sched": "linear_warmup_cosine_lr",
        "init_lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_lr": 1e-3,
        "warmup_steps": 2,
        "weight_decay": 0.05,
        "max_epoch": 2,
        "iters_per_epoch": 4,
        "num_workers": 0,
        "seed": 42,
        "output_dir": str(output_dir),
        "job_id": "job",
        "amp": False,
        "device": "cpu",
        "log_freq": 1,
    }
    run.update(overrides)
    return run


def stage1_config(storage: dict[str, str], output_dir: Path, batch_size: int = 2, **run) -> dict:
    """Stage 1 (no prompt) on the tiny model, mixing the given shard datasets 115:14 as the original."""
    ratios = {"laion": 115, "cc_sbu": 14}
    datasets = {
        name: {"batch_size": batch_size, "sample_ratio": ratios.get(name, 1), "build_info": {"storage": pattern}, **PROCESSORS}
        for name, pattern in storage.items()
    }
    return {"model": tiny_model_section("vicuna0"), "datasets": datasets, "run": run_section(output_dir, **run)}


def stage2_config(align_dir: Path, output_dir: Path, ckpt: str | None = None, batch_size: int = 2, prompt_path: str | None = None, **run) -> dict:
    """Stage 2 settings of the Vicuna config on the tiny model and a cc_sbu_align folder."""
    model = tiny_model_section(
        "vicuna0",
        max_txt_len=160,
        end_sym="###",
        prompt_path=prompt_path or str(REF.parents[2] / "prompts" / "alignment.txt"),
        prompt_template="###Human: {} ###Assistant: ",
    )
    if ckpt:
        model["ckpt"] = ckpt
    datasets = {
        "cc_sbu_align": {
            "batch_size": batch_size,
            "build_info": {"storage": str(align_dir)},
            "vis_processor": {"train": {"name": "blip2_image_eval", "image_size": 224}},
            "text_processor": {"train": {"name": "blip_caption"}},
        }
    }
    return {"model": model, "datasets": datasets, "run": run_section(output_dir, **run)}


def load_train_module():
    """``train.py`` of the repository root, imported by path (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("minigpt4_train_script", REF.parents[2] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
