"""The MiniGPT-4 chat demo in the browser (Gradio 6).

    python demo.py                                      # the nano model: offline, on a CPU
    python demo.py --cfg-path eval_configs/minigpt4_eval.yaml --gpu-id 0

Upload a picture, press "Upload & Start Chat", ask questions; answers stream into the chat box.
Each browser session keeps its own conversation and image embeddings in ``gr.State``; the model
is shared and the queue lets ``--concurrency`` events use it at once. The upload arrives as a
file path that we open and verify ourselves, so a bad file gets a message that says what is
wrong with it instead of Gradio's bare "Error".
"""
from __future__ import annotations

import argparse
import logging

import gradio as gr

from minigpt4.chat import DEFAULT_CFG, load_chat
from minigpt4.conversation import IMAGE_MESSAGE, Chat, Conversation, ImageError, open_image

logger = logging.getLogger("minigpt4.demo")

TITLE = """<h1 align="center">Demo of MiniGPT-4</h1>"""
DESCRIPTION = """<h3>Upload your image and start chatting!</h3>"""
PREVIEW_SIZE = 1024
EMPTY_REPLY = "*(no answer)*"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniGPT-4 chat demo")
    parser.add_argument("--cfg-path", default=str(DEFAULT_CFG), help="evaluation config, e.g. eval_configs/minigpt4_eval.yaml (default: the nano model, offline on a CPU)")
    parser.add_argument("--gpu-id", type=int, default=0, help="GPU to load the model on")
    parser.add_argument("--options", nargs="+", default=[], help="override config settings, key=value (e.g. model.ckpt=...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=1, help="how many uploads/answers may use the model at once")
    parser.add_argument("--max-queue", type=int, default=64, help="events waiting in the queue before new ones are refused")
    parser.add_argument("--no-kv-cache", action="store_true", help="re-encode the whole conversation every turn, as the original")
    return parser.parse_args()


def user_error(message: str) -> gr.Error:
    # Shown on the page; what the server needs is already logged, without Gradio's traceback.
    return gr.Error(message, print_exception=False)


class Handlers:
    """The page's event handlers. Each reads and returns its browser session's state
    (conversation, image embeddings); the only thing they share is the read-only ``chat``."""

    def __init__(self, chat: Chat):
        self.chat = chat

    def start_chat(self, image_path: str | None, conv: Conversation | None, img_list: list):
        if not image_path:
            raise user_error("Please choose an image file first.")
        try:
            image = open_image(image_path)
        except ImageError as err:
            logger.warning("refused an upload: %s", err)
            raise user_error(f"Cannot use this upload: {err}") from None
        conv, img_list = self.chat.new_conversation(), []
        try:
            self.chat.upload_img(image, conv, img_list)
        except Exception as err:
            logger.exception("encoding the uploaded image failed")
            raise user_error(f"Could not process the image: {err}") from None
        preview = image.copy()
        preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
        return (
            gr.update(visible=False, value=None),
            gr.update(visible=True, value=preview),
            gr.update(interactive=False),
            gr.update(interactive=True, placeholder="Type and press Enter"),
            conv,
            img_list,
        )

    def restart(self):
        return (
            [],
            gr.update(visible=True, value=None),
            gr.update(visible=False, value=None),
            gr.update(interactive=True),
            gr.update(interactive=False, value="", placeholder="Please upload your image first"),
            None,
            [],
            "",
        )

    def clear_history(self, conv: Conversation | None, img_list: list):
        # The chat box's own "Clear" keeps the picture and forgets the questions.
        if conv is None:
            return None, ""
        fresh = self.chat.new_conversation()
        for _ in img_list:
            fresh.append_message(fresh.roles[0], IMAGE_MESSAGE)
        fresh.kv_cache = conv.kv_cache  # it still holds the system prompt and the picture
        return fresh, ""

    def ask(self, question: str, chatbot: list, conv: Conversation | None):
        question = (question or "").strip()
        if conv is None:
            gr.Warning("Please upload an image and press 'Upload & Start Chat' first.")
            return gr.update(), chatbot, ""
        if not question:
            gr.Warning("Please type a question.")
            return gr.update(), chatbot, ""
        chatbot = list(chatbot) + [{"role": "user", "content": question}]
        # The textbox stays locked until the answer is in, so questions cannot pile up.
        return gr.update(value="", interactive=False), chatbot, question

    def answer(self, pending: str, chatbot: list, conv: Conversation | None, img_list: list, num_beams: int, temperature: float):
        if not pending or conv is None:
            yield chatbot, conv
            return
        # Work on a copy: the session's conversation changes only when an answer is complete,
        # so a failed generation leaves it usable. The copy takes the KV cache along: a cache
        # always knows what it holds, and one a failed answer wrote into is never used again.
        draft = conv.copy()
        draft.kv_cache = conv.kv_cache
        self.chat.ask(pending, draft)
        chatbot = list(chatbot) + [{"role": "assistant", "content": ""}]
        try:
            for reply in self.chat.stream_answer(draft, img_list, num_beams=int(num_beams), temperature=float(temperature)):
                chatbot[-1] = {"role": "assistant", "content": reply}
                yield chatbot, conv
        except Exception as err:
            logger.exception("generation failed")
            chatbot = chatbot[:-2]
            yield chatbot, conv
            raise user_error(f"Generation failed ({type(err).__name__}: {err}). Ask again or press Restart.") from None
        chatbot[-1] = {"role": "assistant", "content": draft.messages[-1][1] or EMPTY_REPLY}
        yield chatbot, draft


def build_demo(chat: Chat, concurrency: int = 1) -> gr.Blocks:
    """The page of the original demo; ``concurrency`` events may use the model at once."""
    handlers = Handlers(chat)
    with gr.Blocks(title="MiniGPT-4") as demo:
        gr.Markdown(TITLE)
        gr.Markdown(DESCRIPTION)
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-upload")
                image_view = gr.Image(label="Image", type="pil", interactive=False, visible=False, elem_id="image-view")
                upload_button = gr.Button("Upload & Start Chat", variant="primary")
                clear = gr.Button("Restart")
                num_beams = gr.Slider(minimum=1, maximum=10, value=1, step=1, interactive=True, label="beam search numbers")
                temperature = gr.Slider(minimum=0.1, maximum=2.0, value=1.0, step=0.1, interactive=True, label="Temperature")
            with gr.Column(scale=2):
                chat_state = gr.State(None)
                img_list = gr.State([])
                pending = gr.State("")
                chatbot = gr.Chatbot(label="MiniGPT-4", elem_id="chatbot")
                text_input = gr.Textbox(
                    label="User", placeholder="Please upload your image first", interactive=False, elem_id="question"
                )

        model_events = dict(concurrency_id="model", concurrency_limit=concurrency)
        upload_button.click(
            handlers.start_chat,
            [image_file, chat_state, img_list],
            [image_file, image_view, upload_button, text_input, chat_state, img_list],
            show_progress="hidden",  # the error goes to a message, not a red badge on every output
            **model_events,
        )
        text_input.submit(handlers.ask, [text_input, chatbot, chat_state], [text_input, chatbot, pending]).then(
            handlers.answer, [pending, chatbot, chat_state, img_list, num_beams, temperature], [chatbot, chat_state], **model_events
        ).then(
            lambda conv: gr.update(interactive=conv is not None), [chat_state], [text_input]
        )
        chatbot.clear(handlers.clear_history, [chat_state, img_list], [chat_state, pending])
        clear.click(
            handlers.restart, None, [chatbot, image_file, image_view, upload_button, text_input, chat_state, img_list, pending]
        )
    return demo


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("Initializing Chat")
    chat = load_chat(args.cfg_path, args.options, args.gpu_id, reuse_kv_cache=not args.no_kv_cache)
    logger.info("Initialization Finished")
    demo = build_demo(chat, args.concurrency)
    demo.queue(max_size=args.max_queue).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
