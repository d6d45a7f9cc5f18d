"""Applications on top of the library: terminal chat and captioning, the stage-2 data pipeline, the
nano model's evaluation, the weights export and the OpenAI-compatible server. Nothing below imports them."""
