"""Opening an uploaded image: fully decoded, size-limited, or an error that says what is wrong."""
from __future__ import annotations

import os
from typing import IO, Sequence

from PIL import Image

MAX_IMAGE_PIXELS = 50_000_000


class ImageError(ValueError):
    """An upload that is not a usable image; the message names the file and the reason."""


def open_image(
    path: str | os.PathLike | IO[bytes], max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open and fully decode an image file as RGB, or raise :class:`ImageError` saying why not.

    Messages call the file ``name`` (default: its base name, which is what a browser upload's
    temporary path means to its user; a command line passes the path as typed). ``formats``: the
    Pillow formats to try (default: every one Pillow has; the server names the usual few).
    """
    name = os.path.basename(str(path)) if name is None else name
    try:
        with Image.open(path, formats=formats) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageError(
                    f"'{name}' is {width}x{height} = {width * height / 1e6:.3g} megapixels; "
                    f"the limit is {max_pixels / 1e6:.3g} megapixels"
                )
            probe.verify()
        # verify() leaves the file unusable and misses truncated pixel data, so decode it for real.
        with Image.open(path, formats=formats) as image:
            return image.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"'{name}': no such file") from None
    except Image.UnidentifiedImageError:
        kinds = f"one of {', '.join(formats)}" if formats else "a format Pillow can read"
        raise ImageError(f"'{name}' is not an image (or not {kinds})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"'{name}' is a damaged image file ({err})") from None
