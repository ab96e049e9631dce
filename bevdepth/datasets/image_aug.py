"""Image-data augmentation (ida): parameter sampling, the 4x4 ida matrix and the image pipeline.

Reference behaviour (upstream ``bevdepth/datasets/nusc_det_dataset.py``, ``NuscDetDataset.sample_ida_augmentation``
and ``img_transform``): per camera, sample (resize, resize_dims, crop, flip,
rotate); the image is resized (PIL bicubic, antialiased), cropped (zero fill outside), optionally flipped
left-right, rotated counter-clockwise about its centre (nearest, no expand), then normalised by
``mmcv.imnormalize(np.array(pil_rgb), mean, std, to_rgb=True)``. Because the PIL array is already RGB,
``to_rgb=True`` swaps it to **BGR** before the RGB ImageNet mean/std are applied channel-wise.
We keep that quirk: the network's channel 0 is blue, normalised with mean 123.675 / std 58.395.

Two implementations of the pixel pipeline live here:

* ``reference_image_pipeline``: the reference's Pillow steps, kept as the fidelity baseline for tests and
  benchmarks.
* ``fast_image_pipeline``: OpenCV. The JPEG is decoded at 1/2 (or 1/4, 1/8) resolution with libjpeg's DCT
  scaling when the target is that small, resized once with ``cv2.resize``, cropped by slicing, then flip +
  rotation are one nearest-neighbour ``cv2.remap`` gather whose source pixels are bit-identical to
  Pillow's fixed-point rotation (so only the resize filter differs from the reference), and the
  normalisation is a 256-entry lookup table per channel. See docs/dataset.md for the measured speed and tolerance.

Coordinates are continuous pixel coordinates with pixel centres at +0.5 (PIL's and the ida matrix's
convention): ``p_aug = ida_mat @ p_orig``.
"""
import math
import os
import warnings

import cv2
import numpy as np
import torch
from PIL import Image

from bevdepth.configs.nuscenes import IMG_CONF
from bevdepth.datasets.errors import DataError

# A JPEG file ends with the EOI marker; entropy-coded data never contains 0xFF 0xD9 (byte stuffing),
# so its absence from the file tail means the file was cut short.
_JPEG_SOI = b'\xff\xd8'
_JPEG_EOI = b'\xff\xd9'
_JPEG_TAIL_BYTES = 4096

# The largest up-scaling we accept after a reduced (DCT-scaled) JPEG decode before decoding at a finer
# level instead; 1.25 keeps the whole reference training range (resize 0.386..0.55 of 1600x900) on the
# 1/2 decode, whose tolerance vs the Pillow reference is measured in tests/datasets/test_image_aug.py.
_MAX_UPSCALE_AFTER_REDUCED_DECODE = 1.25
_REDUCED_DECODE_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                         8: cv2.IMREAD_REDUCED_COLOR_8}


def sample_ida_augmentation(ida_aug_conf, is_train, rng):
    """Sample one camera's image augmentation exactly like the reference (``NuscDetDataset.sample_ida_augmentation``,
    incl. int() truncations).

    Args:
        ida_aug_conf (dict): resize_lim, final_dim (fH, fW), rot_lim (degrees), H, W, rand_flip, bot_pct_lim.
        is_train (bool): random augmentation when True, the fixed eval transform otherwise.
        rng (numpy.random.Generator): the random source (unused in eval).

    Returns:
        tuple: resize (float), resize_dims (newW, newH), crop (x1, y1, x2, y2), flip (bool),
        rotate (float, degrees, counter-clockwise).
    """
    H, W = ida_aug_conf['H'], ida_aug_conf['W']
    fH, fW = ida_aug_conf['final_dim']
    if is_train:
        resize = float(rng.uniform(*ida_aug_conf['resize_lim']))
        resize_dims = (int(W * resize), int(H * resize))
        newW, newH = resize_dims
        crop_h = int((1 - rng.uniform(*ida_aug_conf['bot_pct_lim'])) * newH) - fH
        crop_w = int(rng.uniform(0, max(0, newW - fW)))
        crop = (crop_w, crop_h, crop_w + fW, crop_h + fH)
        # The reference draws np.random.choice([0, 1]) only when rand_flip is set.
        flip = bool(ida_aug_conf['rand_flip'] and rng.integers(0, 2))
        rotate = float(rng.uniform(*ida_aug_conf['rot_lim']))
    else:
        resize = max(fH / H, fW / W)
        resize_dims = (int(W * resize), int(H * resize))
        newW, newH = resize_dims
        crop_h = int((1 - np.mean(ida_aug_conf['bot_pct_lim'])) * newH) - fH
        crop_w = int(max(0, newW - fW) / 2)
        crop = (crop_w, crop_h, crop_w + fW, crop_h + fH)
        flip = False
        rotate = 0.0
    return resize, resize_dims, crop, flip, rotate


def _check_crop(crop, final_dim):
    fH, fW = final_dim
    if (crop[2] - crop[0], crop[3] - crop[1]) != (fW, fH):
        raise ValueError(f'crop {tuple(crop)} does not have the final size {fW}x{fH} (W x H)')


def ida_matrix(resize, crop, flip, rotate, final_dim):
    """The 4x4 image-augmentation matrix with ``p_aug = ida @ p_orig`` (upstream ``img_transform``).

    rot = resize * I, tran = -crop[:2]; flip: A = diag(-1, 1), rot = A rot, tran = A tran + (fW, 0);
    rotation R = [[cos, sin], [-sin, cos]] about b = (fW / 2, fH / 2): rot = R rot, tran = R tran + b - R b.

    Args:
        resize (float), crop (x1, y1, x2, y2), flip (bool), rotate (degrees), final_dim (fH, fW).

    Returns:
        torch.Tensor: (4, 4) float32.
    """
    _check_crop(crop, final_dim)
    fH, fW = final_dim
    rot = np.eye(2) * resize
    tran = -np.asarray(crop[:2], dtype=np.float64)
    if flip:
        flip_mat = np.array([[-1.0, 0.0], [0.0, 1.0]])
        rot = flip_mat @ rot
        tran = flip_mat @ tran + np.array([fW, 0.0])
    angle = rotate / 180 * np.pi
    rot_mat = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    centre = np.array([fW, fH], dtype=np.float64) / 2
    rot = rot_mat @ rot
    tran = rot_mat @ tran + centre - rot_mat @ centre
    ida = np.zeros((4, 4))
    ida[:2, :2] = rot
    ida[:2, 3] = tran
    ida[2, 2] = ida[3, 3] = 1
    return torch.from_numpy(ida.astype(np.float32))


def _read_image_bytes(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'image file {path} does not exist: check data_root and that the nuScenes '
                        f'samples/ (and sweeps/) folders are fully extracted')
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f'image file {path} is empty: re-extract or re-download it')
    head = data[:2].tobytes()
    if head == _JPEG_SOI and _JPEG_EOI not in data[-_JPEG_TAIL_BYTES:].tobytes():
        raise DataError(f'image file {path} is a truncated JPEG (no end-of-image marker): '
                        f're-extract or re-download it')
    return data


def decode_image_bgr(path, reduction=1):
    """Read an image file as (H, W, 3) uint8 BGR, optionally DCT-scaled by 1/``reduction`` (2, 4, 8).

    Raises DataError (one line, naming the file) when it is missing, empty, truncated or undecodable.
    """
    data = _read_image_bytes(path)
    flags = _REDUCED_DECODE_FLAGS.get(reduction, cv2.IMREAD_COLOR)
    img = cv2.imdecode(data, flags)
    if img is None:
        raise DataError(f'image file {os.fspath(path)} is corrupt or not an image OpenCV can decode: '
                        f're-extract or re-download it')
    return img


ASPECT_TOLERANCE = 0.02  # relative; a DCT-reduced decode rounds its sides up (1600x900 / 8 -> 200x113: 0.4 %)
_warned_about_scale = False


def check_image_geometry(path, decoded_size, reduction, expected_size):
    """Refuse an image whose pixels the calibration does not describe; warn once per process about a rescaled one.

    Args:
        path: the image file (named in the messages).
        decoded_size: (W, H) as decoded, after a JPEG DCT reduction by ``reduction`` (1 = full size).
        expected_size: (W, H) the calibration describes (the info's width / height, nuScenes' 1600x900).

    Another aspect ratio (a crop, a re-encoded copy): the intrinsics and the ida matrices no longer describe the
    pixels, so training would silently learn wrong geometry -> DataError. Same aspect, other scale: the geometry
    holds (the pipeline resizes to the nominal size) but resolution is lost -> one warning per process.
    """
    global _warned_about_scale
    width, height = (int(v) * reduction for v in decoded_size)
    expected_width, expected_height = (int(v) for v in expected_size)
    aspect, expected_aspect = width / height, expected_width / expected_height
    if abs(aspect - expected_aspect) > ASPECT_TOLERANCE * expected_aspect:
        raise DataError(f'image file {os.fspath(path)} is {width}x{height} (aspect {aspect:.3f}) but its calibration '
                        f'describes {expected_width}x{expected_height} (aspect {expected_aspect:.3f}): the intrinsics '
                        f'do not fit these pixels; restore the original image (re-extract the nuScenes archive)')
    if abs(width - expected_width) > reduction and not _warned_about_scale:
        _warned_about_scale = True
        warnings.warn(f'image file {os.fspath(path)} is {width}x{height}, not the calibrated {expected_width}x'
                      f'{expected_height}: same aspect, so the geometry holds, but the network sees rescaled '
                      f'pixels; use the original images (warned once)', stacklevel=2)


def choose_decode_reduction(resize):
    """The largest JPEG DCT reduction (1, 2, 4, 8) that keeps the later up-scaling <= 1.25x."""
    reduction = 1
    for candidate in (2, 4, 8):
        if resize * candidate <= _MAX_UPSCALE_AFTER_REDUCED_DECODE:
            reduction = candidate
    return reduction


def _fixed_point(value):
    """Pillow's 16.16 fixed-point rounding FIX(v) = floor(v * 65536 + 0.5)."""
    return int(math.floor(value * 65536.0 + 0.5))


def pil_rotate_source_map(final_size, flip, rotate):
    """Source pixel of every output pixel of flip + ``PIL.Image.rotate(rotate)`` (nearest, no expand).

    Pillow samples its input at R^-1 (p - c) + c about c = (fW / 2, fH / 2) with cos/sin rounded to 15
    decimals, in 16.16 fixed point (``affine_fixed`` in libImaging/Geometry.c): an accumulated integer
    position whose >> 16 is the source pixel. We evaluate the same integer sums in closed form, so the
    sampled pixels are bit-identical to Pillow's; the flip (u -> fW - 1 - u) is folded in afterwards.

    Args:
        final_size (fW, fH), flip (bool), rotate (degrees, counter-clockwise).

    Returns:
        numpy.ndarray: (fH, fW, 2) int16 (x, y) indices into the cropped image; out-of-range means zero fill.
    """
    fW, fH = final_size
    cx, cy = fW / 2, fH / 2
    angle = -math.radians(rotate)
    a0, a1 = round(math.cos(angle), 15), round(math.sin(angle), 15)
    a3, a4 = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    a2 = a0 * (-cx) + a1 * (-cy) + cx
    a5 = a3 * (-cx) + a4 * (-cy) + cy
    # check_fixed in Pillow guarantees |positions| < 2**31 for images this size: int32 sums are exact.
    xs = np.arange(fW, dtype=np.int32)
    ys = np.arange(fH, dtype=np.int32)
    src = np.empty((fH, fW, 2), dtype=np.int16)
    x_start, y_start = _fixed_point(a2 + a0 * 0.5 + a1 * 0.5), _fixed_point(a5 + a3 * 0.5 + a4 * 0.5)
    src_x = np.add.outer(ys * _fixed_point(a1), x_start + xs * _fixed_point(a0)) >> 16
    if flip:
        src_x = (fW - 1) - src_x
    src[..., 0] = src_x
    src[..., 1] = np.add.outer(y_start + ys * _fixed_point(a4), xs * _fixed_point(a3)) >> 16
    return src


def _crop_zero_filled(img, crop):
    """PIL-style crop: (y2 - y1, x2 - x1, C) with zeros where the box leaves the image (a view if inside)."""
    x1, y1, x2, y2 = crop
    height, width = img.shape[:2]
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
        return img[y1:y2, x1:x2]
    out = np.zeros((y2 - y1, x2 - x1) + img.shape[2:], dtype=img.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out


def _normalise_luts(img_conf):
    """Three (1, 256) float32 lookup tables: uint8 value -> (value - mean[c]) / std[c] for output channel c."""
    mean = np.asarray(img_conf['img_mean'], dtype=np.float64)
    std = np.asarray(img_conf['img_std'], dtype=np.float64)
    values = np.arange(256, dtype=np.float64)
    return [((values - mean[c]) / std[c]).astype(np.float32)[None] for c in range(3)]


_LUT_CACHE = {}


def _cached_luts(img_conf):
    key = (tuple(img_conf['img_mean']), tuple(img_conf['img_std']))
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = _normalise_luts(img_conf)
    return _LUT_CACHE[key]


def fast_image_pipeline(image, resize, resize_dims, crop, flip, rotate, img_conf=IMG_CONF,
                        image_size=None, out=None):
    """OpenCV image pipeline equal to the reference within a small tolerance (docs/dataset.md).

    Args:
        image: path of an image file, or an (H, W, 3) uint8 BGR array.
        resize (float): sampled resize factor (selects the JPEG DCT reduction of a path).
        resize_dims (newW, newH): size of the resized image, as sampled.
        crop (x1, y1, x2, y2), flip (bool), rotate (degrees CCW): as sampled.
        img_conf (dict): img_mean, img_std, to_rgb (True gives BGR channel order, as ``mmcv.imnormalize``).
        image_size (W, H) or None: the full-resolution size of a path's image; only used to pick the
            JPEG DCT reduction (default: assume ``resize`` is the true scale).
        out (numpy.ndarray | None): optional contiguous (3, fH, fW) float32 array to write into.

    Returns:
        numpy.ndarray: (3, fH, fW) float32, normalised, channel order BGR when to_rgb is True.
    """
    newW, newH = resize_dims
    if isinstance(image, np.ndarray):
        img = image
    else:
        # The reference resizes whatever the file holds to resize_dims; pick the DCT reduction from the
        # true scale when the file's size is known (info 'width'/'height'), else from the sampled factor.
        scale = newW / image_size[0] if image_size is not None else resize
        reduction = choose_decode_reduction(scale)
        img = decode_image_bgr(image, reduction)
        if image_size is not None:
            check_image_geometry(image, (img.shape[1], img.shape[0]), reduction, image_size)
    fW, fH = crop[2] - crop[0], crop[3] - crop[1]
    src_h, src_w = img.shape[:2]
    if (src_w, src_h) != (newW, newH):
        # Down-scaling by more than 1.25x: INTER_AREA approximates Pillow's antialiased bicubic;
        # near 1x (after a reduced decode): bicubic like Pillow.
        shrink = min(newW / src_w, newH / src_h)
        interpolation = cv2.INTER_AREA if shrink < 1 / _MAX_UPSCALE_AFTER_REDUCED_DECODE else cv2.INTER_CUBIC
        img = cv2.resize(img, (newW, newH), interpolation=interpolation)
    img = _crop_zero_filled(img, crop)
    if rotate % 360 != 0:
        # Flip + PIL's rotation as one exact nearest-neighbour gather inside the crop window.
        img = cv2.remap(img, pil_rotate_source_map((fW, fH), flip, rotate), None, cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    elif flip:
        img = cv2.flip(img, 1)  # PIL returns an unrotated copy for a multiple of 360 degrees
    if out is None:
        out = np.empty((3, fH, fW), dtype=np.float32)
    channels = cv2.split(np.ascontiguousarray(img))  # OpenCV's order: B, G, R
    if not img_conf.get('to_rgb', True):
        channels = channels[::-1]
    # to_rgb=True: the reference swaps PIL's RGB to BGR, which is OpenCV's order already.
    for channel, value, lut in zip(out, channels, _cached_luts(img_conf)):
        cv2.LUT(value, lut, dst=channel)
    return out


def reference_normalise(img, img_conf=IMG_CONF):
    """``mmcv.imnormalize(img, mean, std, to_rgb)`` on an (H, W, 3) array: float32, optional channel swap,
    subtract mean, multiply by 1 / std. Returns (H, W, 3) float32."""
    img = img.astype(np.float32)
    if img_conf.get('to_rgb', True):
        img = img[:, :, ::-1]
    mean = np.asarray(img_conf['img_mean'], dtype=np.float64)
    std_inv = 1 / np.asarray(img_conf['img_std'], dtype=np.float64)
    return ((img - mean) * std_inv).astype(np.float32)


def reference_image_pipeline(image, resize, resize_dims, crop, flip, rotate, img_conf=IMG_CONF, image_size=None):
    """The reference's Pillow pipeline (upstream ``NuscDetDataset.get_image``), the baseline of the fast pipeline.

    Args:
        image: path of an image file or a PIL image; resize is unused by the pixels (only resize_dims
            is), as in the reference.
        image_size (W, H) or None: the size the calibration describes; a file of another aspect is refused.

    Returns:
        numpy.ndarray: (3, fH, fW) float32 (BGR channel order with the reference's to_rgb=True).
    """
    if isinstance(image, Image.Image):
        img = image
    else:
        _read_image_bytes(image)  # the same one-line errors as the fast pipeline
        try:
            img = Image.open(os.fspath(image))
            img.load()  # decode now, so a corrupt file fails here with its name
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f'image file {os.fspath(image)} is corrupt or not an image Pillow can decode '
                            f'({type(err).__name__}): re-extract or re-download it') from None
        if image_size is not None:
            check_image_geometry(image, img.size, 1, image_size)
    if img.mode != 'RGB':  # nuScenes JPEGs are RGB already; the reference never converted
        img = img.convert('RGB')
    img = img.resize(resize_dims)  # Pillow's default filter for RGB: bicubic (antialiased)
    img = img.crop(crop)
    if flip:
        img = img.transpose(method=Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(rotate)  # counter-clockwise, nearest, about the centre, zero fill
    return np.ascontiguousarray(reference_normalise(np.array(img), img_conf).transpose(2, 0, 1))
