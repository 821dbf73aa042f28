"""Bad-input battery rows: images, texts, arrays at the component boundary, request parameters."""

from __future__ import annotations

import struct

import numpy as np
from battery_helpers import (
    _GIF_1X1,
    _PNG_SIG,
    IMG,
    _bmp_declaring,
    _chunk,
    _encode,
    _fifo,
    _flip_last_byte,
    _ihdr,
    _index_dir,
    _jpeg_declaring,
    _load_image,
    _open_name,
    _pipeline,
    _png_declaring,
    _store_with_package,
    _text_feeds,
    _tokenizer_from_file,
    _tokenizer_from_json,
    _webp_vp8x,
    _with,
    _write,
    case,
)

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError, ModelNotFoundError, UnsupportedError

INPUT_CASES = [
    # --- images: caps and format checked from the header, before any decoder allocates ------------
    case(
        "img-empty-file",
        InvalidInputError,
        r"image is empty \(0 bytes\)",
        lambda e: e.pipe.embed_images([_write(e, "empty.png", b"")]),
    ),
    case(
        "img-truncated-png",
        InvalidInputError,
        r"corrupt or truncated png",
        lambda e: e.pipe.embed_images([_encode(".png")[:-30]]),
        native=True,
    ),
    case(
        "img-truncated-jpeg",
        InvalidInputError,
        r"corrupt or truncated jpeg.*no end-of-image marker",
        lambda e: e.pipe.embed_images([_encode(".jpg")[:-40]]),
        native=True,
    ),
    case(
        "img-pdf",
        InvalidInputError,
        r"image data is an unknown format; accepted formats: png",
        lambda e: e.pipe.embed_images([_write(e, "doc.png", b"%PDF-1.4\n" + b"x" * 100)]),
    ),
    case(
        "img-gif-not-enabled",
        InvalidInputError,
        r"image data is gif, which is not enabled; accepted formats: png, jpeg",
        lambda e: _load_image(_GIF_1X1, formats=("png", "jpeg")),
    ),
    case(
        "img-png-header-20000x20000",
        InvalidInputError,
        r"20000x20000 = 400000000 pixels; the cap is 50000000",
        lambda e: e.pipe.embed_images([_write(e, "huge.png", _png_declaring(20000, 20000))]),
        native=True,
    ),
    case(
        "img-jpeg-header-65000x65000",
        InvalidInputError,
        r"65000x65000 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_jpeg_declaring(65000, 65000)]),
        native=True,
    ),
    case(
        "img-webp-header-16384x16384",
        InvalidInputError,
        r"16384x16384 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_webp_vp8x(16384, 16384)]),
        native=True,
    ),
    case(
        "img-bmp-header-100000x100000",
        InvalidInputError,
        r"100000x100000 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_bmp_declaring(100000, 100000)]),
        native=True,
    ),
    case(
        "img-png-chunk-declares-4GB",
        InvalidInputError,
        r"declares 4294967280 bytes but the file ends first",
        lambda e: e.pipe.embed_images(
            [_PNG_SIG + _ihdr(8, 8) + struct.pack(">I", 0xFFFFFFF0) + b"IDAT" + b"\0" * 64]
        ),
        native=True,
    ),
    case(
        "img-png-200k-chunks",
        InvalidInputError,
        r"PNG has more than 200000 chunks",
        lambda e: e.pipe.embed_images([_PNG_SIG + _ihdr(8, 8) + _chunk(b"tEXt", b"") * 200_001]),
        native=True,
    ),
    case(
        "img-bytes-over-cap",
        InvalidInputError,
        r"image is \d+ bytes; the limit is 64 bytes",
        lambda e: _load_image(_encode(".png"), max_bytes=64),
    ),
    case(
        "img-file-over-cap-not-read",
        InvalidInputError,
        r"image is 65 bytes; the limit is 64 bytes",
        lambda e: _load_image(_write(e, "big.png", b"\0" * 65), max_bytes=64),
    ),
    case(
        "img-fifo-path-never-opened",
        InvalidInputError,
        r"is not a regular file",
        lambda e: e.pipe.embed_images([_fifo(e)]),
    ),
    case(
        "img-missing-file",
        InvalidInputError,
        r"cannot read image file .*No such file",
        lambda e: e.pipe.embed_images([str(e.tmp / "no-such.png")]),
    ),
    case(
        "img-path-with-nul",
        InvalidInputError,
        r"image path contains a NUL character",
        lambda e: e.pipe.embed_images(["a\x00b.png"]),
    ),
    case(
        "img-zero-size-array",
        InvalidInputError,
        r"image has zero size \(10x0\)",
        lambda e: e.pipe.embed_images([np.zeros((0, 10, 3), np.uint8)]),
    ),
    case(
        "img-array-wrong-dtype",
        InvalidInputError,
        r"image array dtype int32; accepted: uint8, float32/64",
        lambda e: e.pipe.embed_images([np.zeros((8, 8, 3), np.int32)]),
    ),
    case(
        "img-array-wrong-rank",
        InvalidInputError,
        r"image array has shape \(2, 8, 8, 3, 1\); accepted",
        lambda e: e.pipe.embed_images([np.zeros((2, 8, 8, 3, 1), np.uint8)]),
    ),
    case(
        "img-array-5-channels",
        InvalidInputError,
        r"image array has shape \(8, 8, 5\)",
        lambda e: e.pipe.embed_images([np.zeros((8, 8, 5), np.uint8)]),
    ),
    case(
        "img-array-nan",
        InvalidInputError,
        r"image array contains NaN or infinity",
        lambda e: e.pipe.embed_images([_with(np.full((8, 8, 3), 0.5, np.float32), (3, 3, 1), np.nan)]),
    ),
    case(
        "img-array-float-out-of-range",
        InvalidInputError,
        r"values in \[0\.0, 255\.0\]; accepted range is \[0, 1\]",
        lambda e: e.pipe.embed_images([_with(np.zeros((8, 8, 3), np.float32), (0, 0, 0), 255.0)]),
    ),
    case(
        "img-array-over-pixel-cap",
        InvalidInputError,
        r"image is 20x20 = 400 pixels; the cap is 100",
        lambda e: _load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100),
    ),
    case(
        "img-channel-order-invalid",
        InvalidInputError,
        r"channel_order 'BRG' is not accepted; use 'RGB' or 'BGR'",
        lambda e: e.pipe.embed_images([IMG], channel_order="BRG"),
    ),
    case(
        "img-not-an-image-object",
        InvalidInputError,
        r"cannot load an image from dict; accepted: a path, bytes",
        lambda e: e.pipe.embed_images([{"path": "a.png"}]),
    ),
    # --- texts: caps and types checked before the Rust tokenizer sees them ------------------------
    case("text-empty", InvalidInputError, r"empty text at index 0", lambda e: e.pipe.embed_texts([""])),
    case(
        "text-whitespace-only",
        InvalidInputError,
        r"empty text at index 1: blank or whitespace-only",
        lambda e: e.pipe.embed_texts(["a cat", " \t\n\u3000"]),
    ),
    case(
        "text-1MB",
        InvalidInputError,
        r"text 0 has 1048576 characters; the limit is 10000",
        lambda e: e.pipe.embed_texts(["a" * (1 << 20)]),
        native=True,
    ),
    case(
        "text-bytes-not-str",
        InvalidInputError,
        r"text 0 is bytes; expected str",
        lambda e: e.pipe.embed_texts([b"bytes are not text"]),
    ),
    case(
        "text-none",
        InvalidInputError,
        r"text 0 is NoneType; expected str",
        lambda e: e.pipe.embed_texts(None),
    ),
    case(
        "text-lone-surrogate",
        InvalidInputError,
        r"text 0 is not valid Unicode",
        lambda e: e.pipe.embed_texts(["ok \ud800 ok"]),
        native=True,
    ),
    case("text-empty-list", InvalidInputError, r"no texts given", lambda e: e.pipe.embed_texts([])),
    case(
        "text-4097-in-one-call",
        InvalidInputError,
        r"4097 texts in one call; the limit is 4096",
        lambda e: e.pipe.embed_texts(["a"] * 4097),
    ),
    case(
        "tokenizer-json-garbage",
        IntegrityError,
        r"cannot parse tokenizer JSON",
        lambda e: _tokenizer_from_json('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}'),
        native=True,
    ),
    case(
        "tokenizer-context-no-room",
        ConfigError,
        r"context_length 2 leaves no room for text after 2 special tokens",
        lambda e: _tokenizer_from_file(e, context_length=2),
    ),
    # --- arrays at the component boundary: dtype, rank, dims and values against the manifest ------
    case(
        "array-wrong-dtype",
        InvalidInputError,
        r"vision\.pixel_values: expected float32 with 4 dims, got float64",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((1, 3, 64, 64))}),
    ),
    case(
        "array-wrong-rank",
        InvalidInputError,
        r"vision\.pixel_values: expected float32 with 4 dims, got float32 \(3, 64, 64\)",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((3, 64, 64), np.float32)}),
    ),
    case(
        "array-fixed-dim-mismatch",
        InvalidInputError,
        r"shape \(1, 3, 32, 32\) does not fit \('batch', 3, 64, 64\)",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}),
    ),
    case(
        "array-dim-above-range",
        InvalidInputError,
        r"text\.input_ids: sequence=33 outside \[1, 32\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.ones((1, 33), np.int64))),
    ),
    case(
        "array-dim-below-range",
        InvalidInputError,
        r"text\.input_ids: sequence=0 outside \[1, 32\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.ones((1, 0), np.int64))),
    ),
    case(
        "array-dims-disagree",
        InvalidInputError,
        r"dim 'sequence' is 5 and 6 in different inputs",
        lambda e: e.pipe.runner.run_batched(
            "text", _text_feeds(np.ones((1, 5), np.int64), np.ones((1, 6), np.int64))
        ),
    ),
    case(
        "array-nan",
        InvalidInputError,
        r"vision\.pixel_values: contains NaN or infinity",
        lambda e: e.pipe.runner.run_batched(
            "vision", {"pixel_values": _with(np.zeros((1, 3, 64, 64), np.float32), (0, 1, 2, 3), np.nan)}
        ),
    ),
    case(
        "array-inf",
        InvalidInputError,
        r"vision\.pixel_values: contains NaN or infinity",
        lambda e: e.pipe.runner.run_batched(
            "vision", {"pixel_values": _with(np.zeros((1, 3, 64, 64), np.float32), (0, 0, 0, 0), -np.inf)}
        ),
    ),
    case(
        "array-missing-input",
        InvalidInputError,
        r"text: missing input 'attention_mask'",
        lambda e: e.pipe.runner.run_batched("text", {"input_ids": np.ones((1, 4), np.int64)}),
    ),
    case(
        "array-list-not-ndarray",
        InvalidInputError,
        r"text\.input_ids: expected a numpy array, got list",
        lambda e: e.pipe.runner.run_batched("text", {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}),
    ),
    case(
        "array-token-id-above-vocab",
        InvalidInputError,
        r"text.input_ids: values must be in \[0, 115\), got values in \[1, 1000000\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.array([[1, 10**6]], np.int64))),
    ),
    case(
        "array-token-id-negative",
        InvalidInputError,
        r"text.input_ids: values must be in \[0, 115\), got values in \[-5, 1\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.array([[1, -5]], np.int64))),
    ),
    case(
        "array-unknown-component",
        IntegrityError,
        r"has no component 'audio'; it has \['text', 'vision'\]",
        lambda e: e.pipe.runner.run_batched("audio", {}),
    ),
    # --- request parameters ----------------------------------------------------------------------
    case(
        "param-search-k-zero",
        InvalidInputError,
        r"k must be a positive int, got 0",
        lambda e: e.pipe.search("a red circle", k=0),
    ),
    case(
        "param-search-k-negative",
        InvalidInputError,
        r"k must be a positive int, got -3",
        lambda e: e.pipe.search("a red circle", k=-3),
    ),
    case(
        "param-search-k-float",
        InvalidInputError,
        r"k must be a positive int, got 2\.5",
        lambda e: e.pipe.search("a red circle", k=2.5),
    ),
    case(
        "param-search-k-str",
        InvalidInputError,
        r"k must be a positive int, got '3'",
        lambda e: e.pipe.search("a red circle", k="3"),
    ),
    case(
        "param-search-k-bool",
        InvalidInputError,
        r"k must be a positive int, got True",
        lambda e: e.pipe.search("a red circle", k=True),
    ),
    case(
        "param-classify-no-labels", InvalidInputError, r"no labels given", lambda e: e.pipe.classify(IMG, [])
    ),
    case(
        "param-classify-blank-label",
        InvalidInputError,
        r"labels must be non-empty strings",
        lambda e: e.pipe.classify(IMG, ["circle", "  "]),
    ),
    case(
        "param-classify-template-without-slot",
        InvalidInputError,
        r"each template must be a string containing '\{\}'",
        lambda e: e.pipe.classify(IMG, ["circle"], templates=["a photo"]),
    ),
    case(
        "param-add-negative-id",
        InvalidInputError,
        r"ids must be 1 non-negative integers",
        lambda e: e.pipe.add_images([IMG], ids=[-1]),
    ),
    case(
        "param-add-duplicate-ids",
        InvalidInputError,
        r"ids must be unique",
        lambda e: e.pipe.add_images([IMG, IMG], ids=[7, 7]),
    ),
    case(
        "param-add-label-count",
        InvalidInputError,
        r"got 1 labels for 2 vectors",
        lambda e: e.pipe.add_images([IMG, IMG], labels=["one"]),
    ),
    case(
        "param-add-ragged-ids",
        InvalidInputError,
        r"ids must be 2 non-negative integers, got a ragged list",
        lambda e: e.pipe.add_images([IMG, IMG], ids=[[1], 2]),
    ),
    case(
        "param-add-labels-not-a-sequence",
        InvalidInputError,
        r"labels must be a sequence with one label per item, got int",
        lambda e: e.pipe.add_images([IMG], labels=5),
    ),
    case(
        "param-unknown-precision",
        UnsupportedError,
        r"precision 'int3' not in \('auto', 'fp32', .*\)",
        lambda e: _pipeline(e, precision="int3"),
    ),
    case(
        "param-precision-not-built",
        UnsupportedError,
        r"component 'text' has no int8 precision \(has \['fp32'\]\); run `mmedge calibrate`",
        lambda e: _pipeline(e, precision="int8").embed_texts(["a red circle"]),
    ),
    case(
        "param-unknown-backend",
        UnsupportedError,
        r"backend 'tflite' is not supported; choose from \['ort', 'tensorrt'\]",
        lambda e: _pipeline(e, backend="tflite"),
    ),
    case(
        "param-unknown-device",
        UnsupportedError,
        r"device 'tpu' is not supported; choose from",
        lambda e: _pipeline(e, device="tpu"),
    ),
    case(
        "param-threads-negative",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got -1",
        lambda e: _pipeline(e, threads=-1),
    ),
    case(
        "param-threads-float",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got 1\.5",
        lambda e: _pipeline(e, threads=1.5),
    ),
    case(
        "param-threads-2^31",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got 2147483648",
        lambda e: _pipeline(e, threads=2**31),
    ),
    case(
        "param-image-formats-unknown",
        ConfigError,
        r"image formats \('tiff',\) are not all supported",
        lambda e: _load_image(IMG, formats=("tiff",)),
    ),
    case(
        "param-unknown-package-name",
        ModelNotFoundError,
        r"no model package 'clip-tinny'; packages in .*: clip-tiny",
        lambda e: (_store_with_package(e), _open_name("clip-tinny")),
    ),
    case(
        "param-empty-store",
        ModelNotFoundError,
        r"no model package 'clip-tiny'; the store .* is empty",
        lambda e: _open_name("clip-tiny"),
    ),
    case(
        "param-index-tampered",
        IntegrityError,
        r"index\.usearch is missing or its sha256 differs",
        lambda e: _index_dir(e, lambda d: _flip_last_byte(d / "index.usearch")),
    ),
    case(
        "param-index-wrong-dimension",
        InvalidInputError,
        r"index has dimension 4; this model embeds to 96",
        lambda e: setattr(e.pipe, "index", _index_dir(e, lambda d: None)),
    ),
]
