from minigpt4.tasks.base_task import BaseTask, setup_task
from minigpt4.tasks.image_text_pretrain import ImageTextPretrainTask

__all__ = ["BaseTask", "ImageTextPretrainTask", "setup_task"]
