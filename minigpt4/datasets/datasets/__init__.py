from minigpt4.datasets.datasets.cc_sbu_align_dataset import CCSBUAlignDataset
from minigpt4.datasets.datasets.generated_shapes import GeneratedShapesDataset
from minigpt4.datasets.datasets.image_text_shards import ImageTextShards

__all__ = ["CCSBUAlignDataset", "GeneratedShapesDataset", "ImageTextShards"]
