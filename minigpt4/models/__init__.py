from minigpt4.models.base_model import BaseModel
from minigpt4.models.mini_gpt4 import MiniGPT4
from minigpt4.models.scene_classifier import SceneClassifier
from minigpt4.models.vision_distiller import VisionDistiller

__all__ = ["BaseModel", "MiniGPT4", "SceneClassifier", "VisionDistiller"]
