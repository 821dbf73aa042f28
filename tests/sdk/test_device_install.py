"""The device install (`pip install mmedge`, no extras): OpenCV is optional and imports stay lazy.

`from mmedge import sdk` must not load OpenCV, ONNX or tokenizers (import time, and OpenCV may be
absent). Without any `cv2`, everything that needs no pixels works, and whatever decodes, resizes
or draws an image raises MissingDependencyError naming the `images` extra and the platform's OpenCV.
Each check runs in a fresh interpreter, so nothing this process already imported hides an import.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from child import run_child

from mmedge.errors import MissingDependencyError, require_opencv

# Makes `import cv2` fail in the child, as on a device with neither the wheel nor the platform's OpenCV.
_NO_CV2 = "import sys\nsys.modules['cv2'] = None\n"


def _run(script: str, *args: str, no_cv2: bool = False) -> str:
    return run_child((_NO_CV2 if no_cv2 else "") + textwrap.dedent(script), "DEVICE_OK", *args)


def test_sdk_import_loads_no_opencv_onnx_or_tokenizers() -> None:
    _run(
        """
        import sys
        from mmedge import sdk
        sdk.Pipeline  # the public entry point is there without loading any of them
        loaded = sorted(m for m in ("cv2", "onnx", "tokenizers", "usearch", "cryptography") if m in sys.modules)
        assert not loaded, f"`from mmedge import sdk` imported {loaded}"
        print("DEVICE_OK")
        """
    )


def test_require_opencv_names_the_extra_and_the_platform_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError, even where it is installed
    with pytest.raises(MissingDependencyError, match=r"mmedge\[images\]") as info:
        require_opencv()
    for platform in ("nvidia-opencv", "python3-opencv", "--system-site-packages"):
        assert platform in str(info.value)
    assert isinstance(info.value, ImportError)  # callers catching ImportError still catch it


def test_image_functions_without_opencv_raise_missing_dependency(tmp_path: Path) -> None:
    _run(
        """
        import numpy as np
        from mmedge.errors import MissingDependencyError
        from mmedge.runtime.images import CLIP_MEAN, CLIP_STD, PreprocessConfig, load_image, normalise, preprocess

        def refused(fn, *args, **kw):
            try:
                fn(*args, **kw)
            except MissingDependencyError as exc:
                assert "pip install 'mmedge[images]'" in str(exc) and "python3-opencv" in str(exc), exc
                return
            raise AssertionError(f"{fn.__name__} ran without OpenCV")

        png = bytes.fromhex(  # a valid 1x1 black PNG (OpenCV's): the header checks pass, then the decoder
            "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000a"
            "49444154081d63000200000400010d3ba4b90000000049454e44ae426082"
        )
        refused(load_image, png)
        path = sys.argv[1] + "/one.png"
        open(path, "wb").write(png)
        refused(load_image, path)
        rgb = np.zeros((40, 30, 3), np.uint8)
        assert load_image(rgb).shape == (40, 30, 3)  # arrays need no decoder
        for resample in ("pil", "cv2"):  # cv2: INTER_AREA when shrinking; both normalise with cv2.LUT
            refused(preprocess, [rgb], PreprocessConfig(16, CLIP_MEAN, CLIP_STD, resample=resample))
        refused(normalise, rgb[None], (0.5,) * 3, (0.5,) * 3, 1 / 255)

        from mmedge.data.export import write_scenes
        refused(write_scenes, 2, sys.argv[1] + "/scenes")
        assert sys.modules["cv2"] is None
        print("DEVICE_OK")
        """,
        str(tmp_path),
        no_cv2=True,
    )


def test_text_side_of_a_package_works_without_opencv(tiny_pkg: Path) -> None:
    """Loading (verification), text embeddings and the CLI's verify need no OpenCV; image embeddings
    name what to install."""
    _run(
        """
        import contextlib, io
        import numpy as np
        from mmedge import sdk
        from mmedge.errors import MissingDependencyError
        from mmedge.sdk import cli

        p = sdk.Pipeline(sys.argv[1], precision="fp32")
        txt = p.embed_texts(["a red circle", "a blue square"])
        assert txt.shape[0] == 2 and np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
        try:
            p.embed_images([np.zeros((32, 32, 3), np.uint8)])
        except MissingDependencyError as exc:
            assert "mmedge[images]" in str(exc), exc
        else:
            raise AssertionError("embed_images ran without OpenCV")
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["verify", sys.argv[1]]) == 0
        print("DEVICE_OK")
        """,
        str(tiny_pkg),
        no_cv2=True,
    )
