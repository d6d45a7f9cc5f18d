from minigpt4.models.base_model import BaseModel
from minigpt4.models.mini_gpt4 import MiniGPT4
from minigpt4.models.scene_classifier import SceneClassifier

__all__ = ["BaseModel", "MiniGPT4", "SceneClassifier"]
