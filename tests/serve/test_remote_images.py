"""minigpt4/apps/serve/images.py: fetching a request's http(s) image, against real HTTP servers on the
loopback (the public-address check, which refuses the loopback, is opened for these tests only;
its own table is in test_engines.py).

One deadline holds for the whole fetch, also against a host that sends a byte now and then (in its
headers or its body) or a name lookup that hangs; redirects, odd headers and bad URLs are refused with 400; formats outside
the usual few are refused even when Pillow could open them.
"""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest
from PIL import Image

from minigpt4.apps.serve import images
from minigpt4.apps.serve.images import ImageLimits, load_image
from minigpt4.apps.serve.protocol import APIError

LIMITS = ImageLimits(allow_remote=True, remote_timeout_s=1.0, max_remote_bytes=64 * 1024)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), "red").save(buffer, "PNG")
    return buffer.getvalue()


class RawServer:
    """A loopback TCP server that answers each connection with ``respond(conn)``."""

    def __init__(self, respond):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.respond = respond
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)  # the request
                try:
                    self.respond(conn)
                except OSError:
                    pass  # the client hung up

    def url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def loopback_allowed(monkeypatch):
    monkeypatch.setattr(images, "is_public", lambda address: True)


@pytest.fixture
def serve():
    servers = []

    def start(respond) -> RawServer:
        servers.append(RawServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def refused(url: str, status: int, code: str, match: str) -> APIError:
    with pytest.raises(APIError) as caught:
        load_image(url, LIMITS, "messages[0].content[0].image_url")
    err = caught.value
    assert (err.status, err.code) == (status, code), err.message
    assert match in err.message and err.param == "messages[0].content[0].image_url"
    return err


def test_a_good_image_is_fetched(loopback_allowed, serve):
    data = png_bytes()
    server = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(data) + data))
    assert load_image(server.url(), LIMITS, "p").size == (24, 16)


@pytest.mark.parametrize(
    "head, byte",
    [(b"HTTP/1.1 200 OK\r\n", b"X"), (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"\x00")],
    ids=["headers", "body"],
)
def test_a_host_that_trickles_is_cut_off_at_the_deadline(loopback_allowed, serve, head, byte):
    def trickle(conn):
        conn.sendall(head)
        for _ in range(40):  # a byte every 0.2 s: each read is quick, the whole is not
            conn.sendall(byte)
            time.sleep(0.2)

    server = serve(trickle)
    start = time.monotonic()
    refused(server.url(), 400, "image_timeout", "took more than 1 s")
    assert time.monotonic() - start < 3


def test_a_name_lookup_that_hangs_costs_the_deadline(monkeypatch):
    monkeypatch.setattr(images.socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(5))
    start = time.monotonic()
    refused("http://images.example.com/x.png", 400, "image_timeout", "looking up 'images.example.com' took too long")
    assert time.monotonic() - start < 3


@pytest.mark.parametrize(
    "head, status, code, match",
    [
        (b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\nContent-Length: 0\r\n\r\n", 400, "invalid_image_url", "redirects are not followed"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 400, "invalid_image_url", "HTTP 404"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n", 400, "invalid_image_url", "Content-Length of 'lots'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", 413, "image_too_large", "larger than 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"\x00" * 70_000, 413, "image_too_large", "larger than 65536 bytes"),
    ],
    ids=["redirect", "404", "bad length", "declared too large", "too large"],
)
def test_what_the_host_sends_wrong_is_a_400_or_413(loopback_allowed, serve, head, status, code, match):
    server = serve(lambda conn: conn.sendall(head))
    refused(server.url(), status, code, match)


@pytest.mark.parametrize("url", ["http://example.com:99999/x.png", "http://[::1/x.png", "http://example.com:port/x.png"])
def test_a_url_python_cannot_parse_is_a_400(url):
    refused(url, 400, "invalid_image_url", "not a valid http(s) URL")


def test_only_the_usual_formats_are_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # Pillow would open it (and run Ghostscript to read it)
    url = "data:application/postscript;base64," + base64.b64encode(eps).decode()
    refused(url, 400, "invalid_image", "not one of PNG, JPEG, WEBP, GIF, BMP, TIFF")


def test_the_operators_pixel_limit_holds_and_the_flag_is_checked():
    from minigpt4.apps.serve.__main__ import check_args, parse_args
    from minigpt4.common.cli import ArgumentError

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert load_image(url, ImageLimits(max_pixels=1024), "p").size == (32, 32)
    with pytest.raises(APIError, match=r"'p' is 32x32 = 0.00102 megapixels; the limit is 0.001 megapixels"):
        load_image(url, ImageLimits(max_pixels=1000), "p")
    with pytest.raises(ArgumentError, match="--max-image-mp: must be positive, got 0.0"):
        check_args(parse_args(["--max-image-mp", "0"]))
    assert parse_args(["--max-image-mp", "4"]).max_image_mp == 4.0
