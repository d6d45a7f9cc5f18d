from minigpt4.datasets.datasets.cc_sbu_align_dataset import CCSBUAlignDataset
from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset
from minigpt4.datasets.datasets.image_text_shards import ImageTextShards
from minigpt4.datasets.datasets.image_text_json_dataset import ImageTextJsonDataset

__all__ = ["CCSBUAlignDataset", "SyntheticShapesDataset", "ImageTextShards", "ImageTextJsonDataset"]
