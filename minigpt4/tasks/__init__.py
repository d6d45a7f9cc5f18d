from minigpt4.tasks.base_task import BaseTask, setup_task
from minigpt4.tasks.image_text_pretrain import ImageTextPretrainTask
from minigpt4.tasks.vision_pretrain import VisionPretrainTask

__all__ = ["BaseTask", "ImageTextPretrainTask", "setup_task", "VisionPretrainTask"]
