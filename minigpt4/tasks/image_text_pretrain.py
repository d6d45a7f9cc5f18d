from minigpt4.common.registry import registry
from minigpt4.tasks.base_task import BaseTask


@registry.register_task("image_text_pretrain")
class ImageTextPretrainTask(BaseTask):
    """Both MiniGPT-4 stages: caption loss of the frozen LLM over the projected image tokens."""
