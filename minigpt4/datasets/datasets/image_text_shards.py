"""``laion`` and ``cc_sbu``: image-caption pairs in webdataset tar shards, read endlessly.

As the original: shards are drawn at random with replacement ("resampled"), samples pass a
1000-sample shuffle buffer, ``jpg`` is decoded to RGB and goes through the train image
processor, ``json["caption"]`` through the text processor. Unlike the original, a broken sample
or shard never stops training: it is skipped, logged and counted.
"""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from minigpt4.datasets.data_utils import DatasetError, SampleError, seeded_call

logger = logging.getLogger(__name__)


def _tariterators(location: str):
    """webdataset's tar readers, imported on first use: chat and the demo do without the ``train`` extra."""
    try:
        from webdataset import tariterators
    except ImportError:
        raise DatasetError(f"{location}: reading webdataset shards needs the webdataset package; run: pip install 'webdataset>=0.2.100'") from None
    return tariterators


class ImageTextShards:
    def __init__(
        self,
        shards: Sequence[str],
        vis_processor: Callable,
        text_processor: Callable,
        location: str = "build_info.storage",
        shuffle_buffer: int = 1000,
    ):
        self.shards = list(shards)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.location = location  # the config key, for messages
        self.shuffle_buffer = shuffle_buffer
        _tariterators(location)  # fail at build time, not in a loader worker

    def _files(self, url: str) -> Iterator[dict[str, Any]]:
        with open(url, "rb") as stream:
            for item in _tariterators(self.location).tar_file_iterator(stream):
                item["__url__"] = url
                yield item

    def raw_samples(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Undecoded samples (``{"__key__", "jpg": bytes, "json": bytes, ...}``) without end."""
        barren = 0  # shards in a row that gave nothing: all broken means an error, not a hang
        while True:
            url = rng.choice(self.shards)
            count = 0
            try:
                for sample in _tariterators(self.location).group_by_keys(self._files(url)):
                    count += 1
                    yield sample
            except (tarfile.TarError, OSError, ValueError) as err:
                logger.warning("%s: skipping the rest of shard '%s' (%s: %s)", self.location, url, type(err).__name__, err)
            barren = 0 if count else barren + 1
            if barren >= max(10, 3 * len(self.shards)):
                raise DatasetError(f"{self.location}: {barren} shards in a row held no readable sample (last: '{url}')")

    def process(self, raw: dict[str, Any], seed: int) -> dict[str, Any]:
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        if "jpg" not in raw or "json" not in raw:
            raise SampleError(f"{where}: has no jpg+json pair (found {sorted(k for k in raw if not k.startswith('__'))})")
        try:
            image = Image.open(io.BytesIO(raw["jpg"]))
            image = image.convert("RGB")  # forces the full decode, so a truncated file fails here
            caption = json.loads(raw["json"])["caption"]
        except Exception as err:  # PIL and json raise many types for bad bytes
            raise SampleError(f"{where}: {type(err).__name__}: {err}") from None
        if not isinstance(caption, str):
            raise SampleError(f"{where}: json 'caption' is {type(caption).__name__}, not text")
        return {"image": seeded_call(seed, self.vis_processor, image), "answer": self.text_processor(caption)}
