"""The images of a request: ``data:`` URLs always; ``http(s)`` URLs only when the operator allows
them, and then only from public addresses; never a local file.

A remote fetch resolves the host once, refuses it if ANY of its addresses is not global (private,
loopback, link-local, multicast, reserved, and IPv6 addresses that carry one of those as IPv4:
mapped, NAT64, 6to4, Teredo), connects to the address it checked (so a second DNS answer cannot
point elsewhere), follows no redirect, and stops at a size limit and at one deadline for the whole
fetch (name lookup, connection, headers and body together: a host that sends a byte now and then
cannot hold the request).
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from minigpt4.apps.serve.protocol import APIError
from minigpt4.conversation import MAX_IMAGE_PIXELS, ImageError, open_image

# The formats a request's image may be in: the usual ones, not everything Pillow can open (EPS would
# run Ghostscript where it is installed).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Name lookups run here, so that one which hangs costs its request the deadline, not a worker forever.
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="minigpt4-serve-dns")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # DNS64 networks: an IPv4 host at 64:ff9b::a.b.c.d
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # a network's own translation: any IPv4, anywhere in it

@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MAX_IMAGE_PIXELS
    allow_remote: bool = False
    max_remote_bytes: int = 10 * 2**20
    remote_timeout_s: float = 10.0


def load_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """The decoded RGB image ``url`` names, or :class:`APIError` (400, 413) saying why not."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, param)
    elif scheme in ("http", "https") and limits.allow_remote:
        data = fetch_public(url, limits, param)
    elif scheme in ("http", "https"):
        raise APIError(400, f"{param}: this server does not fetch http(s) images (its operator can allow it with "
                       "--allow-remote-images); send the image inline as a data: URL", param, "remote_images_disabled")
    else:
        accepted = "data: and http(s) URLs" if limits.allow_remote else "data: URLs"
        raise APIError(400, f"{param}: only {accepted} are accepted; a file path or file: URL is never read", param, "invalid_image_url")
    try:
        return open_image(io.BytesIO(data), max_pixels=limits.max_pixels, name=param, formats=FORMATS)
    except ImageError as err:
        raise APIError(400, str(err), param, "invalid_image") from None


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise APIError(400, f"{param}: expected a base64 data URL (data:image/png;base64,...)", param, "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL is not valid base64", param, "invalid_image_url") from None


def is_public(address: str) -> bool:
    """Whether ``address`` is a global unicast address (never private, loopback, link-local, ...).
    An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4) is as public as that one;
    Teredo tunnels and local-use NAT64 are refused."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index names a local link
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or ip in NAT64_LOCAL:
            return False
        inner = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if inner is not None:
            return is_public(str(inner))
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, seconds: float, param: str) -> list[str]:
    lookup = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=max(seconds, 0))
    except FutureTimeout:
        raise APIError(400, f"{param}: looking up '{host}' took too long", param, "image_timeout") from None
    except (socket.gaierror, UnicodeError) as err:
        raise APIError(400, f"{param}: cannot resolve '{host}' ({err})", param, "invalid_image_url") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if not is_public(address):
            raise APIError(400, f"{param}: '{host}' resolves to {address}, which is not a public address; "
                           "images are fetched from public hosts only", param, "image_url_not_public")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to now."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # the certificate is checked against the name


def fetch_public(url: str, limits: ImageLimits, param: str) -> bytes:
    """GET ``url`` from a public address, no redirects, at most ``max_remote_bytes`` within ``remote_timeout_s`` in all."""
    bad_url = APIError(400, f"{param}: not a valid http(s) URL", param, "invalid_image_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of range, a malformed IPv6 host
        raise bad_url from None
    https = parts.scheme.lower() == "https"
    if not parts.hostname:
        raise APIError(400, f"{param}: no host in the URL", param, "invalid_image_url")
    port = port or (443 if https else 80)
    deadline = time.monotonic() + limits.remote_timeout_s
    address = _resolve(parts.hostname, port, limits.remote_timeout_s, param)[0]
    kind = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    connection = kind(parts.hostname, address, port, max(deadline - time.monotonic(), 0.01))
    # At the deadline the socket is shut down, whatever the fetch is waiting for.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(max(deadline - time.monotonic(), 0), expire)
    timer.start()
    too_slow = APIError(400, f"{param}: fetching the image took more than {limits.remote_timeout_s:g} s", param, "image_timeout")
    try:
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers={"Accept": "image/*", "User-Agent": "minigpt4-serve"})
        response = connection.getresponse()
        if 300 <= response.status < 400:
            raise APIError(400, f"{param}: the server redirects (HTTP {response.status}); redirects are not followed", param, "invalid_image_url")
        if response.status != 200:
            raise APIError(400, f"{param}: fetching the image gave HTTP {response.status}", param, "invalid_image_url")
        data = _read_limited(response, limits, param)
        if expired.is_set():
            raise too_slow
        return data
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set():
            raise too_slow from None
        raise APIError(400, f"{param}: fetching the image failed ({type(err).__name__}: {err})", param, "invalid_image_url") from None
    finally:
        timer.cancel()
        connection.close()


def _read_limited(response: http.client.HTTPResponse, limits: ImageLimits, param: str) -> bytes:
    too_large = APIError(413, f"{param}: the image is larger than {limits.max_remote_bytes} bytes", param, "image_too_large")
    declared = response.getheader("Content-Length") or "0"
    if not declared.strip().isdigit():
        raise APIError(400, f"{param}: the image's host sent a Content-Length of {declared[:40]!r}", param, "invalid_image_url")
    if int(declared) > limits.max_remote_bytes:
        raise too_large
    data = bytearray()
    while chunk := response.read1(65536):
        data += chunk
        if len(data) > limits.max_remote_bytes:
            raise too_large
    return bytes(data)
