from minigpt4.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from minigpt4.datasets.builders.image_text_pair_builder import (
    CCSBUAlignBuilder,
    CCSBUBuilder,
    SyntheticShapesBuilder,
    LaionBuilder,
)
from minigpt4.datasets.builders.image_text_json_builder import ImageTextJsonBuilder

__all__ = ["BaseDatasetBuilder", "CCSBUAlignBuilder", "CCSBUBuilder", "SyntheticShapesBuilder", "LaionBuilder", "ImageTextJsonBuilder"]
