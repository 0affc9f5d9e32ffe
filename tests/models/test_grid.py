import io

import numpy as np
import pytest
from PIL import Image

from models.grid import png_bytes


@pytest.mark.parametrize("shape", [(28, 28, 1), (1, 1, 1), (7, 13, 3), (5, 3, 4), (64, 31, 1)])
def test_png_bytes_decodes_to_the_same_pixels(shape: tuple[int, int, int]) -> None:
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pil = Image.open(io.BytesIO(png_bytes(img)))
    pil.load()  # raises on a bad CRC or a truncated stream
    assert pil.size == (shape[1], shape[0])
    assert pil.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    back = np.asarray(pil)
    assert np.array_equal(back.reshape(shape), img)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 1), np.float32), np.zeros((4, 4), np.uint8)]
)
def test_png_bytes_refuses_what_it_cannot_write(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        png_bytes(bad)
