"""An OpenAI-compatible server for MiniGPT-4: ``python -m minigpt4.apps.serve`` (see ``__main__``).

:func:`create_app` builds the FastAPI app on a ``Chat``; the chat's engine (in-process transformers,
or a vLLM server) does the generating and batches concurrent requests.
"""
from minigpt4.apps.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
