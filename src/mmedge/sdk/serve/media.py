"""Image URLs of requests -> encoded image bytes, under the operator's rules.

- `data:image/...;base64,...`: always accepted; the bytes then meet the pipeline's image caps
  (`runtime.images.ImageLimits`: bytes, pixels, decoded size, JPEG scans) before any decoding.
- `file://` URLs: only inside the directory the operator allows (`--allow-files`), after resolving
  symlinks, and only regular files.
- `http(s)://` URLs: only to allowed hosts (`--allow-host`). Every address the host resolves to must
  be public (no loopback, private, link-local, multicast or reserved range), the connection goes to
  an address that was checked (so a second DNS answer cannot swap it), redirects are refused, and
  the body is capped while it is read.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mmedge.runtime.images import ImageLimits
from mmedge.sdk.serve.errors import ApiError

Resolver = Callable[[str, int], list[str]]


def _refused(message: str, code: str = "invalid_image_url") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refused(f"cannot resolve image host {host!r}: {exc}") from None
    return sorted({str(info[4][0]) for info in infos})


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_reserved)


class ImageFetcher:
    """Turns the `url` of an `image_url` part into image bytes, or refuses it with a 400."""

    def __init__(
        self,
        allow_files: Path | None,
        allow_hosts: tuple[str, ...],
        limits: ImageLimits,
        timeout_s: float,
        resolver: Resolver = _resolve,
    ):
        self.root = allow_files.resolve() if allow_files is not None else None
        self.hosts = tuple(h.lower() for h in allow_hosts)
        self.limits, self.timeout_s, self.resolver = limits, timeout_s, resolver

    def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._data(url)
        if scheme == "file":
            return self._file(url)
        if scheme in ("http", "https"):
            return self._remote(url)
        raise _refused("image_url must be a data: URL (base64), a file:// URL or an http(s):// URL")

    def _data(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
            raise _refused("a data URL image must be data:image/<format>;base64,<data>")
        if len(payload) > (self.limits.max_bytes // 3 + 1) * 4:  # before decoding anything
            raise _refused(f"the image is larger than {self.limits.max_bytes} bytes", "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _refused("the data URL is not valid base64") from None

    def _file(self, url: str) -> bytes:
        if self.root is None:
            raise _refused("file:// image URLs are not enabled on this server", "file_urls_disabled")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise _refused("a file:// URL must name a local path: file:///path/to/image")
        raw = unquote(parts.path)
        if "\x00" in raw:
            raise _refused("the file path contains a NUL character")
        try:
            path = Path(raw).resolve(strict=True)
            inside = os.path.commonpath([path, self.root]) == str(self.root)
        except (OSError, ValueError, RuntimeError):
            inside, path = False, Path(raw)
        if not inside:  # the same answer for "missing" and "outside": no probing of other folders
            raise _refused(
                "the file is not in the directory this server allows images from", "file_not_allowed"
            )
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise _refused("the file is not a regular file", "file_not_allowed")
                if info.st_size > self.limits.max_bytes:
                    raise _refused(
                        f"the image is larger than {self.limits.max_bytes} bytes", "image_too_large"
                    )
                return f.read(self.limits.max_bytes + 1)
        except OSError as exc:
            raise _refused(f"cannot read the image file: {exc.strerror or exc}", "file_not_allowed") from None

    def _allowed_host(self, host: str) -> bool:
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def _remote(self, url: str) -> bytes:
        if not self.hosts:
            raise _refused("remote image URLs are not enabled on this server", "remote_urls_disabled")
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise _refused("the image URL is malformed") from None
        host = (parts.hostname or "").lower()
        if parts.username or parts.password or not host:
            raise _refused("the image URL must name a host and carry no credentials")
        if not self._allowed_host(host):
            raise _refused(f"image host {host!r} is not on this server's allow-list", "host_not_allowed")
        addresses = self.resolver(host, port)
        if not addresses:
            raise _refused(f"image host {host!r} has no address")
        private = [a for a in addresses if not is_public(a)]
        if private:  # every answer is checked: one private address is enough to refuse
            raise _refused(
                f"image host {host!r} resolves to a non-public address ({private[0]})", "host_not_allowed"
            )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return self._get(parts.scheme.lower(), host, addresses[0], port, target)

    def _get(self, scheme: str, host: str, address: str, port: int, target: str) -> bytes:
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = _PinnedHTTPS(host, address, port, self.timeout_s)
        else:
            conn = _PinnedHTTP(host, address, port, self.timeout_s)
        try:
            conn.request(
                "GET", target, headers={"Host": host, "Accept": "image/*", "User-Agent": "mmedge-serve"}
            )
            resp = conn.getresponse()
            if 300 <= resp.status < 400:
                raise _refused("the image URL redirects; redirects are not followed", "redirect_refused")
            if resp.status != 200:
                raise _refused(f"the image URL answered HTTP {resp.status}", "fetch_failed")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.limits.max_bytes:
                raise _refused(f"the image is larger than {self.limits.max_bytes} bytes", "image_too_large")
            data = resp.read(self.limits.max_bytes + 1)
            if len(data) > self.limits.max_bytes:
                raise _refused(f"the image is larger than {self.limits.max_bytes} bytes", "image_too_large")
            return data
        except (OSError, http.client.HTTPException) as exc:
            raise _refused(f"cannot fetch the image: {type(exc).__name__}", "fetch_failed") from None
        finally:
            conn.close()


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address while the request names the host."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address, with the certificate checked against the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
