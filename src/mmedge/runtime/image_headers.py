"""Image container headers: format sniffing, pixel dimensions and EXIF orientation (torch-free).

Everything here reads a few header bytes and never decodes pixels, so the pixel cap in
`images.load_image` can reject a decompression bomb before a decoder allocates anything.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

FORMATS = ("png", "jpeg", "bmp", "webp", "gif")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
_EXIF_PREFIX = b"Exif\x00\x00"
# Real files have a few dozen segments before the pixels (PNG: one IDAT per 8-64 KB); a crafted
# file with millions would make the Python walk slow, so stop early.
_MAX_CHUNKS = 10_000
_MAX_PNG_CHUNKS = 200_000


class HeaderError(ValueError):
    """A header is truncated or malformed; the caller turns it into a user-facing error."""


@dataclass(frozen=True)
class ImageHeader:
    """What the container says before decoding: format, size and EXIF orientation (1 = upright)."""

    format: str
    width: int
    height: int
    orientation: int = 1
    # Bytes per pixel of the decoder's output (channels x sample size); 4 where the header does not say.
    bytes_per_pixel: int = 4
    scans: int = 1  # JPEG scans: a progressive decoder makes one pass over the image per scan

    @property
    def decoded_bytes(self) -> int:
        """What the decoder allocates for the pixels, before any conversion."""
        return self.width * self.height * self.bytes_per_pixel


def sniff_format(data: bytes) -> str | None:
    """Name the container from its magic bytes (never the file extension); None if unknown."""
    if data.startswith(_PNG_SIG):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    return None


def read_header(data: bytes, fmt: str) -> ImageHeader:
    """Parse width, height and orientation of a `fmt` container; raises HeaderError if malformed."""
    try:
        return _PARSERS[fmt](data)
    except (struct.error, IndexError) as exc:
        raise HeaderError(f"truncated {fmt} header") from exc


def _png(data: bytes) -> ImageHeader:
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise HeaderError("PNG does not start with an IHDR chunk")
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    # OpenCV's unchanged decode: grey 1 channel, RGB 3, grey+alpha and RGBA 4, palette 3 or 4 (tRNS).
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(color, 4)
    bytes_per_pixel = channels * (2 if depth > 8 else 1)
    # Walk every chunk to IEND: OpenCV's PNG reader allocates each chunk's declared length before
    # reading it, so a 2 KB file declaring a 4 GB chunk would allocate 4 GB. The first eXIf counts
    # wherever it is, as in PIL (libpng only looks before IDAT).
    orientation, pos = None, 8
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > len(data):
            raise HeaderError("PNG is truncated (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > len(data) - pos - 12:
            raise HeaderError(f"PNG chunk {kind!r} declares {length} bytes but the file ends first")
        if kind == b"IEND":
            return ImageHeader("png", width, height, orientation or 1, bytes_per_pixel)
        if kind == b"eXIf" and orientation is None:
            orientation = _tiff_orientation(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    raise HeaderError(f"PNG has more than {_MAX_PNG_CHUNKS} chunks")


def _jpeg(data: bytes) -> ImageHeader:
    pos, orientation, size, bytes_per_pixel = 2, None, None, 3
    for _ in range(_MAX_CHUNKS):
        found = _JPEG_MARKER.match(data, pos)  # any number of 0xFF fill bytes may precede a marker
        if found is None:
            raise HeaderError("JPEG marker expected")
        marker, pos = found.group(1)[0], found.end()
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
            continue
        if marker in (0xD8, 0xD9):
            raise HeaderError("JPEG ends before its image data")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise HeaderError("JPEG segment length is invalid")
        segment = data[pos + 2 : pos + length]
        if marker == 0xE1 and segment.startswith(_EXIF_PREFIX) and orientation is None:
            orientation = _tiff_orientation(segment[len(_EXIF_PREFIX) :])
        elif marker in _JPEG_SOF and size is None:
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            size = (width, height)
            bytes_per_pixel = max(components, 1) * (2 if precision > 8 else 1)
        elif marker == 0xDA:  # start of scan: headers are over
            if size is None:
                raise HeaderError("JPEG has no frame header before its scan")
            # Entropy-coded data never contains FFD9 except as the real end-of-image marker, so a
            # missing one means the file was cut short (libjpeg would pad it with grey silently).
            end = data.find(b"\xff\xd9", pos + length)
            if end < 0:
                raise HeaderError("JPEG is truncated (no end-of-image marker)")
            # The same holds for FFDA: every one before the end is another scan, and a progressive
            # decoder makes a pass over the whole image for each (2,000 scans: a minute per image).
            scans = 1 + data.count(b"\xff\xda", pos + length, end)
            return ImageHeader("jpeg", size[0], size[1], orientation or 1, bytes_per_pixel, scans)
        pos += length
    raise HeaderError(f"JPEG has more than {_MAX_CHUNKS} segments before its image data")


def _bmp(data: bytes) -> ImageHeader:
    (dib,) = struct.unpack_from("<I", data, 14)
    if dib == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack_from("<HH", data, 18)
    elif dib >= 40:
        width, height = struct.unpack_from("<ii", data, 18)
        height = abs(height)  # negative height means top-down rows
        if width < 0:
            raise HeaderError("BMP width is negative")
    else:
        raise HeaderError(f"BMP info header of {dib} bytes is not a known version")
    return ImageHeader("bmp", width, height)


def _gif(data: bytes) -> ImageHeader:
    width, height = struct.unpack_from("<HH", data, 6)  # logical screen: what decoders allocate
    return ImageHeader("gif", width, height)


def _webp(data: bytes) -> ImageHeader:
    kind = data[12:16]
    if kind == b"VP8X":
        if len(data) < 30:
            raise HeaderError("truncated webp header")
        flags = data[20]
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        orientation = _webp_exif(data) if flags & 0x08 else 1
        return ImageHeader("webp", width, height, orientation)
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8 frame has no start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise HeaderError("WebP VP8L stream has no signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    raise HeaderError(f"WebP first chunk {kind!r} is not VP8, VP8L or VP8X")


def _webp_exif(data: bytes) -> int:
    pos = 12
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > len(data):
            break
        kind, length = struct.unpack_from("<4sI", data, pos)
        if kind == b"EXIF":
            return _tiff_orientation(data[pos + 8 : pos + 8 + length])
        pos += 8 + length + (length & 1)  # chunks are padded to even length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in a TIFF/EXIF block; 1 when absent or unreadable."""
    tiff = tiff.removeprefix(_EXIF_PREFIX)  # some writers keep the JPEG prefix in PNG/WebP
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(min(count, 1024)):
            tag, kind, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and kind == 3 and magic == 42:
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass  # a broken EXIF block does not make the pixels unusable; show them as stored
    return 1


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """View of an (H, W, C) array made upright for an EXIF orientation 1-8 (as PIL's exif_transpose)."""
    if orientation in (5, 6, 7, 8):  # these swap the axes
        rgb = rgb.transpose(1, 0, 2)
    flip_rows = orientation in (3, 4, 7, 8)
    flip_cols = orientation in (2, 3, 6, 7)
    return rgb[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]


_PARSERS = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "webp": _webp, "gif": _gif}
