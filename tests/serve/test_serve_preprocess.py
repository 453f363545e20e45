"""Upload decoding and the eval transform: identical to the training loader's, safe on hostile input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from serve_util import photo, png_bomb

from mycodist.config import load_config
from mycodist.serve.preprocess import BadImage, EvalTransform, decode_image, original_size


@pytest.mark.parametrize("size,fmt", [((96, 64), "JPEG"), ((64, 200), "JPEG"), ((1600, 1200), "JPEG"),
                                      ((300, 257), "PNG")])
def test_eval_transform_matches_the_loader(size, fmt):
    """One eval transform (mycodist/preprocess.py): an upload decoded by serving (EXIF, draft from the upright
    original size) gives the loader's exact tensor."""
    from mycodist.preprocess import EvalPreprocess

    assert EvalTransform is EvalPreprocess  # not a copy held equal by this test
    from mycodist.data.transforms import ImageConfig, decode_eval, to_output

    cfg = load_config(None, ["model.img_size=64"])
    ic = ImageConfig.from_config(cfg)
    tf = EvalTransform.from_config(cfg)
    data = photo(size=size, fmt=fmt)
    expected = to_output(torch.from_numpy(decode_eval(data, ic).copy()).unsqueeze(0), ic)[0]
    got = tf(decode_image(data, 10**8, tf))
    assert got.shape == expected.shape == (3, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_normalise_is_the_torch_arithmetic_bit_for_bit():
    """Every uint8 value in every channel: the NumPy normalisation serving runs in its decode threads gives
    exactly PyTorch's float32 `x * scale - shift` (the loader's and the GPU's arithmetic), so moving it off
    PyTorch's thread pool changed no answer."""
    from mycodist.preprocess import scale_shift

    tf = EvalTransform(size=16, mean=(0.5, 0.45, 0.4), std=(0.2, 0.25, 0.3))
    pixels = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    pixels[..., 1] = pixels[..., 1].T  # not just one pattern copied
    scale, shift = scale_shift(tf.mean, tf.std)
    expected = (torch.from_numpy(pixels).float() * torch.tensor(scale) - torch.tensor(shift)).permute(2, 0, 1)
    got = tf.normalise(pixels)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (3, 16, 16)
    assert torch.equal(got, expected)
    assert torch.equal(tf.normalise(pixels[::-1]), expected.flip(1))  # a non-contiguous view reads the same


def test_transform_reads_an_old_config_without_data_keys():
    tf = EvalTransform.from_config({"model": {"img_size": 48}})
    assert tf.size == 48 and tf.eval_crop == 0.875


def test_exif_orientation_makes_the_photo_upright():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90° clockwise: red ends up on top
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), 10**6)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert original_size(out) == (20, 40)


def test_original_size_survives_draft_decoding():
    cfg = load_config(None, ["model.img_size=64"])
    tf = EvalTransform.from_config(cfg)
    img = decode_image(photo(size=(1600, 1200), fmt="JPEG"), 10**8, tf)
    assert img.size[0] < 1600  # decoded at a reduced scale
    assert original_size(img) == (1600, 1200)


def test_transparency_is_flattened_on_white():
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert np.asarray(decode_image(buf.getvalue(), 10**6)).min() == 255


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"GIF89a", "not an image|corrupt"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 40, "not an image|corrupt"),
    (b"  <?xml version='1.0'?><svg/>", "SVG"),
    (b"%PDF-1.7\n", "not an image"),
])
def test_hostile_bytes_are_refused(data, match):
    with pytest.raises(BadImage, match=match) as e:
        decode_image(data, 10**6)
    assert e.value.status == 400


def test_bomb_is_refused_from_its_header():
    with pytest.raises(BadImage, match="pixels"):
        decode_image(png_bomb(20_000, 20_000), max_pixels=64_000_000)
    # a big but honest declared size below the cap gets past the header check (and fails later: no data)
    with pytest.raises(BadImage, match="corrupt"):
        decode_image(png_bomb(4000, 3000), max_pixels=64_000_000)


def test_tiff_is_not_accepted():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    with pytest.raises(BadImage, match="not an image"):
        decode_image(buf.getvalue(), 10**6)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode_image(buf.getvalue(), 10**6))[6, 6]
    assert px[0] > 200 and px[1] < 60
