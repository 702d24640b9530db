from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm.errors import ImageReadError
from vlm.io import read, read_image, render


def test_png_8_and_16_bit_and_rgb(tmp_path):
    g8 = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    g16 = (np.arange(64 * 48) * 20).astype(np.uint16).reshape(48, 64)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgb = np.dstack([g8, g8[::-1], 255 - g8])
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)

    a = read_image(tmp_path / "g8.png")
    assert a.pixels.shape == (48, 64) and a.pixels.dtype == np.float32
    np.testing.assert_array_equal(a.pixels, g8)
    b = read(tmp_path / "g16.png")
    np.testing.assert_array_equal(b.pixels, g16)  # type: ignore[union-attr]
    assert b.meta.bits_stored == 16
    c = read_image(tmp_path / "rgb.jpg")
    assert c.pixels.shape == (48, 64, 3) and c.meta.samples_per_pixel == 3
    assert render(c).shape == (48, 64, 3)
    assert render(a).max() == 255 and render(a).min() == 0


def test_broken_png_is_a_read_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")


def huge_png(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a few hundred bytes on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_read_error(tmp_path):
    """A 400-megapixel PNG was an internal DecompressionBombError (not an OSError)."""
    huge_png(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(ImageReadError, match=r"huge\.png: too large to decode safely") as info:
        read_image(tmp_path / "huge.png")
    assert "\n" not in str(info.value)
    # 100 megapixels is only PIL's warning; where warnings are errors it is refused the same way
    huge_png(tmp_path / "big.png", 10_000, 10_000)
    import warnings

    from vlm.io import read_raster

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError, match=r"big\.png: too large to decode safely"):
            read_raster(tmp_path / "big.png")
