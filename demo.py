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
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from minigpt4.chat import DEFAULT_CFG, load_chat
from minigpt4.common.cli import add_gpu_id, existing_file, free_port_for, port_number
from minigpt4.conversation import IMAGE_MESSAGE, Chat, Conversation, ImageError, open_image
from minigpt4.conversation.engines import DECODES

logger = logging.getLogger("minigpt4.demo")

TITLE = """<h1 align="center">Demo of MiniGPT-4</h1>"""
DESCRIPTION = """<h3>Upload your image and start chatting!</h3>"""
NANO_INTRO = (
    "This is the **nano MiniGPT-4**: a small vision encoder and Q-Former trained on pictures of coloured shapes, "
    "bridged into SmolLM2-135M-Instruct (frozen, with small LoRA adapters). It knows 1 to 3 circles, squares and "
    "triangles in six colours (red, green, blue, yellow, purple, orange) on a white background: ask it to describe a "
    "scene, then how many shapes there are, what colour or where one is, or whether there is one. A photo gets an "
    "answer about shapes. "
    "To chat about real pictures, load the released weights: "
    "`python demo.py --cfg-path eval_configs/minigpt4_eval.yaml` (see the README, \"Chat with MiniGPT-4\")."
)
NUM_EXAMPLES = 6
EXAMPLE_SEED = 2  # training draws seed 0, the evaluation seed 1
PREVIEW_SIZE = 1024
EMPTY_REPLY = "*(no answer)*"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniGPT-4 chat demo")
    parser.add_argument("--cfg-path", default=str(DEFAULT_CFG), help="evaluation config, e.g. eval_configs/minigpt4_eval.yaml (default: the nano model, offline on a CPU)")
    add_gpu_id(parser)
    parser.add_argument("--options", nargs="+", default=[], help="override config settings, key=value (e.g. model.ckpt=...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=port_number, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=1, help="how many uploads/answers may use the model at once")
    parser.add_argument("--max-queue", type=int, default=64, help="events waiting in the queue before new ones are refused (default: 64)")
    parser.add_argument("--no-kv-cache", action="store_true", help="re-encode the whole conversation every turn, as the original")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="static: our decode loop, its step one CUDA graph on a GPU (the KV cache is the loop's own)")
    args = parser.parse_args()
    for flag in ("concurrency", "max_queue"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    return args


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

    @staticmethod
    def pick_example(paths: list[str]):
        """The gallery's click handler: put the clicked scene in the upload box."""

        def pick(event: gr.SelectData) -> str:
            return paths[event.index]

        return pick

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
            return None, "", gr.update()
        fresh = self.chat.new_conversation()
        for _ in img_list:
            fresh.append_message(fresh.roles[0], IMAGE_MESSAGE)
        fresh.kv_cache = conv.kv_cache  # it still holds the system prompt and the picture
        return fresh, "", gr.update(interactive=True)  # also after an answer it stopped

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
        """Stream the answer to ``pending``; temperature 0 decodes greedily."""
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
            decoding = dict(num_beams=int(num_beams), do_sample=float(temperature) > 0)
            if decoding["do_sample"]:
                decoding["temperature"] = float(temperature)
            for reply in self.chat.stream_answer(draft, img_list, **decoding):
                chatbot[-1] = {"role": "assistant", "content": reply}
                yield chatbot, conv
        except Exception as err:
            logger.exception("generation failed")
            chatbot = chatbot[:-2]
            yield chatbot, conv
            raise user_error(f"Generation failed ({type(err).__name__}: {err}). Ask again or press Restart.") from None
        chatbot[-1] = {"role": "assistant", "content": draft.messages[-1][1] or EMPTY_REPLY}
        yield chatbot, draft


def example_scenes(folder: Path, count: int = NUM_EXAMPLES) -> list[str]:
    """Held-out scenes of the nano model's kind, drawn by the package (nothing is downloaded)."""
    from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset

    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=count, seed=EXAMPLE_SEED)
    paths = []
    for index in range(count):
        path = folder / f"scene_{index}.png"
        if not path.is_file():
            _, image = scenes.scene(index)
            # drawn at the model's 64 px; shown at 256 px, nearest-neighbour so the edges stay sharp
            image.resize((256, 256), Image.NEAREST).save(path)
        paths.append(str(path))
    return paths


def build_demo(chat: Chat, concurrency: int = 1) -> gr.Blocks:
    """The page of the original demo; ``concurrency`` events may use the model at once.

    On the nano model the page says what it is and offers example scenes to click.
    """
    handlers = Handlers(chat)
    nano = chat.model_type == "nano"
    greedy = not chat.generation["do_sample"]
    with gr.Blocks(title="MiniGPT-4 (nano)" if nano else "MiniGPT-4") as demo:
        gr.Markdown(TITLE)
        if nano:
            gr.Markdown(NANO_INTRO, elem_id="model-intro")
        gr.Markdown(DESCRIPTION)
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-upload")
                image_view = gr.Image(label="Image", type="pil", interactive=False, visible=False, elem_id="image-view")
                upload_button = gr.Button("Upload & Start Chat", variant="primary")
                clear = gr.Button("Restart")
                num_beams = gr.Slider(
                    minimum=1, maximum=10, value=chat.generation["num_beams"], step=1, interactive=True, label="beam search numbers"
                )
                temperature = gr.Slider(
                    minimum=0.0, maximum=2.0, value=0.0 if greedy else chat.generation["temperature"], step=0.1,
                    interactive=True, label="Temperature (0: greedy)",
                )
            with gr.Column(scale=2):
                chat_state = gr.State(None)
                img_list = gr.State([])
                pending = gr.State("")
                chatbot = gr.Chatbot(label="MiniGPT-4", elem_id="chatbot")
                text_input = gr.Textbox(
                    label="User", placeholder="Please upload your image first", interactive=False, elem_id="question"
                )
        if nano:
            # in the temp folder, where Gradio may serve files from
            examples = example_scenes(Path(tempfile.gettempdir()) / "minigpt4-demo-examples")
            gallery = gr.Gallery(
                value=examples, label="Example scenes: click one, then press Upload & Start Chat", columns=NUM_EXAMPLES,
                rows=1, height=200, object_fit="contain", allow_preview=False, interactive=False, elem_id="examples",
            )
            gallery.select(handlers.pick_example(examples), None, image_file)

        model_events = dict(concurrency_id="model", concurrency_limit=concurrency)
        upload_button.click(
            handlers.start_chat,
            [image_file, chat_state, img_list],
            [image_file, image_view, upload_button, text_input, chat_state, img_list],
            show_progress="hidden",  # the error goes to a message, not a red badge on every output
            **model_events,
        )
        answering = text_input.submit(handlers.ask, [text_input, chatbot, chat_state], [text_input, chatbot, pending]).then(
            handlers.answer, [pending, chatbot, chat_state, img_list, num_beams, temperature], [chatbot, chat_state], **model_events
        )
        answering.then(lambda conv: gr.update(interactive=conv is not None), [chat_state], [text_input])
        # Clearing or restarting while an answer is written stops that answer: its last step would
        # otherwise put the old conversation back into the session.
        chatbot.clear(handlers.clear_history, [chat_state, img_list], [chat_state, pending, text_input], cancels=[answering])
        clear.click(
            handlers.restart, None, [chatbot, image_file, image_view, upload_button, text_input, chat_state, img_list, pending],
            cancels=[answering],
        )
    return demo


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    existing_file("--cfg-path", args.cfg_path)  # before the model loads
    free_port_for(args.host, args.port)
    logger.info("Initializing Chat")
    chat = load_chat(args.cfg_path, args.options, args.gpu_id, reuse_kv_cache=not args.no_kv_cache, decode=args.decode)
    logger.info("Initialization Finished")
    demo = build_demo(chat, args.concurrency)
    # quiet: Gradio's own banner would tell a user to edit launch() for the public link --share gives.
    app, local_url, share_url = demo.queue(max_size=args.max_queue).launch(
        server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True,
    )
    if share_url:
        logger.info("the demo is on %s and %s", local_url, share_url)
    elif args.share:
        logger.warning("the demo is on %s; the public link could not be made (see Gradio's message above)", local_url)
    else:
        logger.info("the demo is on %s (--share for a public link too)", local_url)
    demo.block_thread()


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
