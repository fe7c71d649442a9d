"""
The `device` data path (train.py --data_pipeline device): the data workers read each file's bytes and draw its
augmentation; the device decodes a batch of JPEGs in one call (nvJPEG on CUDA, libjpeg on the CPU) and crops,
resizes, flips and RandAugments it with about 400 tensor ops, whatever the batch's size. The workers' path
(timm's transforms on PIL images) costs 3-5 ms of CPU an ImageNet image, which caps a 16-core node near 3,100
img/s; a worker here spends 0.18 ms an image (its bytes, the JPEG header, the draws).

Faithful to timm by construction: the draws are timm's own (its crop's get_params, torchvision's flip, timm's
RandAugment with its ops recording their arguments instead of applying them), in timm's order from the same
per-sample seed; the ops are PIL's arithmetic on batches (its fixed-point resize, cubic, luma, truncations).

    dataset = ImageFolder(root, loader=read_file, transform=Draw(timm_train_transform))  # in the workers
    loader = DataLoader(RobustDataset(dataset), collate_fn=collate, ...)
    for images, labels, bad in device_batches(loader, device, mean, std, augment=Augment(224, True, mean)): ...

A sample's draws are one float64 row: (top, left, height, width, flip, op, level, op, level), one (op, level)
pair for each of RandAugment's SLOTS layers, -1 where there is nothing (eval, or a layer that skipped its op).
An op is its index in OPS.
"""
import contextlib
import copy
import functools
import io
import os
import queue
import sys
import threading

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

# The one JPEG decoder: TorchCodec's where it loads, else torchvision's (deprecated there since 0.29), the same call.
# An installed TorchCodec may not load: one built for another torch fails to load its library (OSError), an older
# one without FFmpeg raises RuntimeError, and one older still has no decode_jpeg (ImportError).
try:
    from torchcodec.decoders import decode_jpeg
except (ImportError, OSError, RuntimeError):
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        decode_jpeg = None

# ---------------------------------------------------------------- in the data workers: bytes and draws

# timm's RandAugment 'inc1' set, which --rand_augment selects, in timm's order.
OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
    'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
    'TranslateXRel', 'TranslateYRel',
]
SLOTS = 2  # RandAugment's num_layers (timm's default 'n2'); a skipped op (its probability 0.5) records nothing
# How each op runs on a batch: a lookup table, a blend with a degenerate image, or an affine transform.
TABLE = (0, 1, 2, 4, 5, 6)
BLEND = (7, 8, 9, 10)
GEOMETRIC = (3, 11, 12, 13, 14)
CHUNK = 2 ** 25  # pixels of padded crops resized at once: bounds the resize's memory (about 0.8 GB) on big images
HELPER_JOIN_TIMEOUT = 10  # seconds a closed device_batches waits for its helper thread to end


def read_file(path):
    """The file's name and bytes (a uint8 tensor): train.py's ImageFolder loader on this path."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    return path, torch.frombuffer(data, dtype=torch.uint8)


def record(name, drawn, *level_args, **_):
    """What a RandAugment op calls instead of its PIL function: `drawn`, the list the ops are applied to, with
    this op's name and level arguments appended. PIL's keyword arguments (fillcolor, resample) are Augment's."""
    return drawn + [(name, level_args)]


def parts(timm_transform):
    """The crop, the flip and the RandAugment in timm's train transform (a Compose), by type."""
    steps = timm_transform.transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    flip = next(t for t in steps if isinstance(t, transforms.RandomHorizontalFlip))
    rand_augment = next(t for t in steps if isinstance(t, RandAugment))
    return crop, flip, rand_augment


def gpu_decodable(header, data):
    """What the device decodes: a baseline colour JPEG, whole, stored upright. Greyscale, CMYK, progressive,
    rotated, PNG: PIL, in the worker."""
    if header.format != 'JPEG' or header.mode != 'RGB' or 'progression' in header.info:
        return False
    # A whole file ends with the EOI marker. A truncated one goes to PIL, which raises, and the bad-file handling
    # replaces it.
    if data[-2:].tolist() != [0xFF, 0xD9]:
        return False
    # EXIF orientation (tag 0x0112) 1 is upright. TorchCodec would apply a rotation that PIL and timm do not.
    return header.getexif().get(0x0112, 1) == 1


def chw(rgb):
    """A PIL RGB image's pixels as a (3, height, width) uint8 tensor: a view of its HWC array."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


class Draw:
    """A worker's per-sample transform: (the bytes, or PIL's uint8 image where the device does not decode; the
    draws (top, left, height, width, flip, op, level, op, level) as timm makes them; the name). Without a timm
    transform (eval), the draws are all -1."""

    def __init__(self, timm_transform=None):
        self.crop = None
        self.flip = None
        self.rand_augment = None
        if timm_transform:
            self.crop, self.flip, self.rand_augment = parts(timm_transform)
        if self.rand_augment:
            # A copy, so that the caller's transform keeps applying PIL's ops.
            self.rand_augment = copy.deepcopy(self.rand_augment)
            assert [op.name for op in self.rand_augment.ops] == OPS
            assert self.rand_augment.num_layers == SLOTS
            # timm's draws, unchanged: only what an op does with them is replaced, by recording them.
            for op in self.rand_augment.ops:
                op.aug_fn = functools.partial(record, op.name)

    def __call__(self, item):
        # read_file's (name, bytes), or a PIL image (torchvision's datasets).
        name = ''
        if isinstance(item, tuple):
            name, item = item
        if isinstance(item, Image.Image):
            header = item
        else:
            # Opening reads the header alone: PIL decodes when the pixels are first asked for.
            header = Image.open(io.BytesIO(item.numpy()))
        # What the device does not decode is decoded here, before the draws, as timm decodes (and a broken file
        # fails) before its transform.
        if isinstance(item, Image.Image) or not gpu_decodable(header, item):
            item = chw(header.convert('RGB')).contiguous()
        params = torch.full((5 + 2 * SLOTS,), -1.0, dtype=torch.float64)
        if self.crop:
            params[:4] = torch.tensor(self.crop.get_params(header, self.crop.scale, self.crop.ratio))
            # torchvision's RandomHorizontalFlip, as timm calls it.
            params[4] = float(torch.rand(1) < self.flip.p)
            for slot, (op, level_args) in enumerate(self.rand_augment([])):
                # AutoContrast, Equalize and Invert have no level: 0. In float64: float32 would round the levels.
                level = level_args[0] if level_args else 0
                column = 5 + 2 * slot
                params[column:column + 2] = torch.tensor([OPS.index(op), level], dtype=torch.float64)
        return item, params, name


def collate(samples):
    """RobustDataset's (sample, label, bad) triples as ((bytes, shapes, params, names), labels, bad file names).
    The images' bytes go in one flat tensor, which crosses from the worker in one piece of shared memory: a tensor
    for each would be one file descriptor each, which the file_descriptor sharing strategy runs out of."""
    items, labels, bad = zip(*samples)
    images, params, names = zip(*items)
    flat = torch.cat([image.flatten() for image in images])
    shapes = [tuple(image.shape) for image in images]
    batch = (flat, shapes, torch.stack(params), list(names))
    return batch, torch.tensor(labels), list(bad)


# ---------------------------------------------------------------- on the device: decode, crop, resize, flip, ops

def to_device(arrays, device):
    """A dict of numpy arrays as device tensors (float64), through one host-to-device copy from pinned memory:
    one launch, and no wait for the device."""
    flattened = [np.asarray(a, np.float64).ravel() for a in arrays.values()]
    flat = torch.from_numpy(np.concatenate(flattened))
    if device.type == 'cuda':
        flat = flat.pin_memory().to(device, non_blocking=True)
    pieces = flat.split([np.size(a) for a in arrays.values()])
    return {key: piece.view(np.shape(a)) for (key, a), piece in zip(arrays.items(), pieces)}


def resize_taps(in_size, out_size, first, count, ksize):
    """PIL's bicubic resize coefficients (precompute_coeffs, then normalize_coeffs_8bpc's 22-bit fixed point) for
    outputs first..first+count of each image: tap positions and weights (n, count, ksize), from PIL's own double
    arithmetic, operation for operation."""
    # Downscaling widens the filter by the scale (antialiasing), and its support (2 input pixels a side) with it.
    scale = (in_size / out_size)[:, None, None]
    filterscale = scale.clamp(min=1)
    support = 2.0 * filterscale
    # Each output pixel's centre, in input pixels, and its first tap (PIL's xmin).
    outputs = first[:, None, None] + torch.arange(count, device=scale.device)[:, None]
    center = (outputs + 0.5) * scale
    xmin = (center - support + 0.5).trunc().clamp(min=0)
    x = xmin + torch.arange(ksize, device=scale.device)
    # PIL's bicubic filter (a = -0.5) at each tap's distance from the centre, in units of the filter's scale.
    t = ((x - center + 0.5) * (1.0 / filterscale)).abs()
    near = t < 1
    inner = (1.5 * t - 2.5) * t * t + 1
    outer = (((t - 5) * t + 8) * t - 4) * -0.5
    w = torch.where(near, inner, outer)
    # No weight outside the filter's support, nor from PIL's xmax on (the support's end, within the image).
    within_support = t < 2
    xmax = (center + support + 0.5).trunc().minimum(in_size[:, None, None])
    w = w * (within_support & (x < xmax))
    w = w / w.sum(2, keepdim=True)
    positions = x.long()
    # normalize_coeffs_8bpc: 22-bit fixed point, rounded half away from zero.
    weights = (w * 2 ** 22 + (w.sign() * 0.5)).trunc() / 2 ** 22
    return positions, weights


def dense(taps, in_max):
    """The taps as (n, count, in_max) matrices. The scatter leaves room for taps past the end, which the slice
    drops: their weights are 0."""
    x, w = taps
    n, count, ksize = w.shape
    matrix = torch.zeros(n, count, in_max + ksize, dtype=w.dtype, device=w.device).scatter_add_(2, x, w)
    return matrix[:, :, :in_max]


def resize(flat, plan, taps, hmax, wmax):
    """Each image's box of the flat decoded batch resized as PIL resizes it (horizontal pass, rounded to uint8,
    vertical pass; a matmul with PIL's coefficients is PIL's sum exactly, fp64 holding every partial sum), padded
    to the largest box (hmax, wmax), where the weights are 0. Returns (n, 3, size, size) in whole levels."""
    n = len(plan['box'])
    device = flat.device
    top, left, h, w = plan['box'].long().T
    start = plan['start'].long()
    stride_c = plan['stride_c'].long()
    stride_y = plan['stride_y'].long()
    stride_x = plan['stride_x'].long()
    # Each box's pixels in the flat batch, whatever the image's layout. Rows and columns go up to the largest box's:
    # the padding repeats the box's last row and column.
    row_in_box = torch.arange(hmax, device=device).minimum(h[:, None] - 1)
    rows = (top[:, None] + row_in_box) * stride_y[:, None]
    col_in_box = torch.arange(wmax, device=device).minimum(w[:, None] - 1)
    cols = (left[:, None] + col_in_box) * stride_x[:, None]
    planes = start[:, None] + torch.arange(3, device=device) * stride_c[:, None]
    index = planes[:, :, None, None] + rows[:, None, :, None] + cols[:, None, None, :]
    crops = flat[index].double()
    # The horizontal pass, rounded and clipped to uint8 as PIL stores it between passes.
    pixel_rows = crops.view(n, 3 * hmax, wmax)
    across = pixel_rows @ dense(taps[0], wmax).transpose(1, 2)
    across = (across + 0.5).floor_().clamp_(0, 255).view(n, 3, hmax, -1)
    # The vertical pass, rounded and clipped the same way.
    down = dense(taps[1], hmax)[:, None] @ across
    return (down + 0.5).floor_().clamp_(0, 255).float()


def blend(degenerate, x, factor):
    """PIL's Image.blend, as ImageEnhance uses it: clipped, then truncated."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def luma(x):
    """PIL's convert('L'): ITU-R 601-2 in 16-bit fixed point, exact in float32 (all sums < 2 ** 24)."""
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def auto_contrast(x):
    """ImageOps.autocontrast's tables: each channel stretched to 0..255, truncated, in float64; a channel of one
    level keeps its levels."""
    lo, hi = x.flatten(2).aminmax(dim=2)
    lo = lo.double()[..., None]
    hi = hi.double()[..., None]
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = 255 / (hi - lo).clamp(min=1)
    stretches = hi > lo
    stretched = (levels * scale - lo * scale).floor().clamp(0, 255)
    return torch.where(stretches, stretched, levels)


def equalize(x):
    """ImageOps.equalize's tables: PIL's integer arithmetic on each channel's histogram."""
    values = x.flatten(2).long()
    histogram = torch.zeros(*values.shape[:2], 256, dtype=torch.long, device=x.device)
    ones = torch.ones(1, dtype=torch.long, device=x.device).expand_as(values)
    histogram.scatter_add_(2, values, ones)
    # PIL's step: the pixels below the top level, over 255. A step of 0 (one level, or fewer than 255 pixels below
    # the top one) keeps the levels.
    top_level = values.amax(2, keepdim=True)
    below_top = values.shape[2] - histogram.gather(2, top_level)
    step = below_top // 255
    # Level i maps to (step // 2 + the pixels below level i) // step.
    table = (step // 2 + histogram.cumsum(2) - histogram) // step.clamp(min=1)
    equalizes = step > 0
    table = table.clamp(max=255)
    levels = torch.arange(256, device=x.device)
    return torch.where(equalizes, table, levels).double()


def smooth(x):
    """PIL's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13, the border kept), which ImageEnhance.Sharpness blends with.
    The separable sums are exact in float32, and no rounding tie can occur (13 is odd), so rounding their quotient
    is what PIL's float kernel does."""
    vertical = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = vertical[..., :-2] + vertical[..., 1:-1] + vertical[..., 2:]
    out = x.clone()
    centre = x[:, :, 1:-1, 1:-1]
    out[:, :, 1:-1, 1:-1] = ((box + 4 * centre) / 13).round_()
    return out


@functools.cache
def pil_cubic(device):
    """PIL's cubic (a = -1) as the matrix that turns [1 t t^2 t^3] into the 4 taps' weights, (4, 4, 1). Made once a
    device: a tensor made from Python numbers on the device is a copy from pageable memory, which waits for it."""
    matrix = [[0, -1, 2, -1], [1, 0, -2, 1], [0, 1, 1, -1], [0, 0, -1, 1]]
    return torch.tensor(matrix, device=device)[..., None]


def cubic_taps(src, size, cubic):
    """The 4 taps of PIL's cubic along one axis, at input positions `src` (n, h * w): their positions, clamped to
    the image (its edge pixels repeated), and their weights, [1 t t^2 t^3] times PIL's cubic; each (n, 4, h * w)."""
    base = src.floor()
    powers = (src - base)[:, None] ** torch.arange(4, device=src.device)[:, None]
    positions = (base[:, None] + torch.arange(-1, 3, device=src.device)[:, None]).clamp_(0, size - 1)
    weights = (powers[:, None] * cubic).sum(2)
    return positions, weights


def affine(x, fill, coefficients):
    """PIL's Image.transform(AFFINE, BICUBIC, fillcolor) per image: output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f), coefficients (n, 6), with PIL's cubic (a = -1, where torch's grid_sample has
    -0.75), edges clamped, and is `fill` where that falls outside. 4 gathers of 4 taps each."""
    n, _, h, w = x.shape
    a, b, c, d, e, f = coefficients.float().T[..., None]
    pixel = torch.arange(h * w, device=x.device)
    col = pixel % w + 0.5
    row = pixel // w + 0.5
    # Where each output pixel samples the input, (n, h * w).
    src_x = a * col + b * row + c
    src_y = d * col + e * row + f
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    cubic = pil_cubic(x.device)
    # Input pixel i has its centre at i + 0.5.
    from_x = src_x - 0.5
    from_y = src_y - 0.5
    x_index, x_weight = cubic_taps(from_x, w, cubic)
    y_index, y_weight = cubic_taps(from_y, h, cubic)
    flat = x.flatten(2)
    out = torch.zeros_like(flat)
    # Each y tap's row as an offset into the flattened image.
    row_start = y_index * w
    # One row of 4 taps at a time: 4x less memory than all 16 at once.
    for i in range(4):
        index = (row_start[:, i:i + 1] + x_index).long().view(n, 1, -1).expand(-1, 3, -1)
        samples = flat.gather(2, index).view(n, 3, 4, -1)
        weights = (y_weight[:, i:i + 1] * x_weight)[:, None]
        out += (samples * weights).sum(2)
    sampled = out.clamp_(0, 255).floor_()
    return torch.where(inside[:, None], sampled, fill.view(1, 3, 1)).view_as(x)


def lookup_tables(op, level):
    """The ops that are a table, in double as PIL's ImageOps makes them: each image's (n, 256), the identity where
    the image drew another op."""
    levels = np.arange(256.0)
    o = op[:, None]
    u = level[:, None]
    # Invert.
    table = np.where(o == 2, 255 - levels, levels)
    # Posterize keeps the top `level` bits. At 0 bits the image is black, as PIL < 12 made it (PIL >= 12 refuses
    # 0 bits); where the op is another, its level is no bit count.
    bits = np.where(o == 4, u, 0)
    table = np.where(o == 4, levels - levels % 2 ** (8 - bits), table)
    # Solarize inverts the levels from the threshold up.
    table = np.where(o == 5, np.where(levels < u, levels, 255 - levels), table)
    # SolarizeAdd adds the level to the levels under 128, up to 255.
    table = np.where(o == 6, np.where(levels < 128, np.minimum(levels + u, 255), levels), table)
    return table


def affine_coefficients(op, level, size):
    """The geometric ops as PIL's affine coefficients (a, b, c, d, e, f) for each size x size image, (n, 6): the
    identity where the image drew another op."""
    zero = 0 * level
    one = 1 + 0 * level
    # PIL's rotate: its inverse matrix, rounded to 15 decimals as PIL rounds it, about the image's centre.
    angle = -np.radians(np.where(op == 3, level, 0))
    cos = np.cos(angle).round(15)
    sin = np.sin(angle).round(15)
    centre = size / 2
    shift_x = cos * -centre + sin * -centre + centre
    shift_y = -sin * -centre + cos * -centre + centre
    # The level of a shear is its slope; a relative translation's is a share of the image.
    rows = {
        3: (cos, sin, shift_x, -sin, cos, shift_y),
        11: (one, level, zero, zero, one, zero),
        12: (one, zero, zero, level, one, zero),
        13: (one, zero, level * size, zero, one, zero),
        14: (one, zero, zero, zero, one, level * size),
    }
    coefficients = np.stack([one, zero, zero, zero, one, zero], 1)
    for k, row in rows.items():
        coefficients[op == k] = np.stack(row, 1)[op == k]
    return coefficients


def host_plan(params, size):
    """What the ops need, from the draws, on the host (numpy, in double as PIL): each slot's lookup table (identity
    where the image drew none), blend factor (1 where none), affine coefficients, and which images transform."""
    plan = {}
    for slot in range(SLOTS):
        op = params[:, 5 + 2 * slot]
        level = params[:, 6 + 2 * slot]
        plan[slot] = dict(
            op=op,
            table=lookup_tables(op, level),
            factor=np.where(np.isin(op, BLEND), level, 1.0),
            coefficients=affine_coefficients(op, level, size),
            geometric=np.flatnonzero(np.isin(op, GEOMETRIC)),
        )
    return plan


def table_ops(x, op, table, drawn):
    """Each image through its lookup table: the host's, or AutoContrast's or Equalize's, which depend on the image
    and are made here."""
    table = table[:, None].expand(-1, 3, -1)
    if 0 in drawn:
        table = torch.where(op == 0, auto_contrast(x), table)
    if 1 in drawn:
        table = torch.where(op == 1, equalize(x), table)
    table = table.float()
    levels = x.flatten(2).long()
    return table.gather(2, levels).view_as(x)


def blend_ops(x, op, factor, drawn):
    """Color, Contrast, Brightness and Sharpness: one blend, each image with its degenerate image, which is the
    grey image, its mean level, black or the smoothed image."""
    grey = luma(x)
    # PIL's Contrast: the grey image's mean, rounded.
    mean = (grey.double().mean((1, 2, 3), keepdim=True) + 0.5).floor().float()
    is_color = op == 7
    is_contrast = op == 8
    # The smoothed image costs a pass of its own: made only where some image drew Sharpness.
    smoothed = 0
    if 10 in drawn:
        smoothed = smooth(x)
    degenerate = torch.where(is_contrast, mean, smoothed)
    degenerate = torch.where(is_color, grey, degenerate)
    degenerate = torch.where(op == 9, 0, degenerate)
    return blend(degenerate, x, factor.float())


def rand_augment_slot(x, slot, drawn, fill):
    """One RandAugment layer over the batch, each image's own op in three batched stages (tables, blends,
    geometry), which leave an image that drew another op unchanged. `drawn` (host): which ops some image drew."""
    op = slot['op'][:, None, None]
    if drawn & set(TABLE):
        x = table_ops(x, op, slot['table'], drawn)
    if drawn & set(BLEND):
        x = blend_ops(x, op[..., None], slot['factor'], drawn)
    if len(slot['geometric']):
        geometric = slot['geometric'].long()
        transformed = affine(x[geometric], fill, slot['coefficients'][geometric])
        x = x.index_copy(0, geometric, transformed)
    return x


def replace_unreadable(decoded, errors, params, labels, names):
    """Each unreadable image replaced by the next readable one of the batch, with its draws and label, as
    RobustDataset replaces a file the workers cannot read. Changes `decoded` and `params` in place; returns the
    labels and the bad files' names, with why."""
    n = len(names)
    bad = []
    if errors:
        labels = labels.clone()
    for i in sorted(errors):
        # The next readable one, wrapping around; an image replaced before counts as readable.
        j = next(k % n for k in range(i, i + n) if k % n in decoded)
        decoded[i] = decoded[j]
        params[i] = params[j]
        labels[i] = labels[j]
        why = str(errors[i]).splitlines()[0]
        bad.append(f"{names[i]} (device decode: {why})")
    return labels, bad


def chunk_bounds(box):
    """[start, end) of each chunk of the boxes (sorted by area): consecutive images whose crops, padded to the
    chunk's largest height and width, hold at most CHUNK pixels; an image alone is a chunk, however big."""
    bounds = [0]
    for end in range(1, len(box) + 1):
        start = bounds[-1]
        count = end - start
        if count > 1 and 3 * count * box[start:end, 2:].max(0).prod() > CHUNK:
            bounds.append(end - 1)
    bounds.append(len(box))
    return bounds


def axis_taps(plan, arrays, axis, size):
    """resize_taps along one axis of the sorted batch (0: heights, 1: widths), with taps enough for its largest
    downscale: PIL's 2 ceil(support) + 1, the support 2 input pixels a side times the scale."""
    largest_scale = max(1, (arrays['box'][:, 2 + axis] / arrays['out'][:, axis]).max())
    ksize = 2 * int(np.ceil(2 * largest_scale)) + 1
    in_size = plan['box'][:, 2 + axis]
    out_size = plan['out'][:, axis]
    first = plan['first'][:, axis]
    return resize_taps(in_size, out_size, first, size, ksize)


def resize_batch(images, arrays, plan, size):
    """The decoded images' boxes resized and cropped to size x size, in chunks of similar sizes (sorted by area:
    less padding), back in the batch's order: (n, 3, size, size), in whole levels."""
    # Each image's memory in one tensor, whatever its layout (CHW or HWC, as decoded): the plan's strides index it.
    flat = torch.cat([image.as_strided((image.numel(),), (1,)) for image in images])
    # PIL's horizontal pass first (across the widths), then the vertical one (down the heights).
    taps = [axis_taps(plan, arrays, 1, size), axis_taps(plan, arrays, 0, size)]
    box = arrays['box']
    chunks = chunk_bounds(box)
    resized = []
    for start, end in zip(chunks, chunks[1:]):
        chunk = {key: plan[key][start:end] for key in ('start', 'stride_c', 'stride_y', 'stride_x', 'box')}
        chunk_taps = [(x[start:end], w[start:end]) for x, w in taps]
        hmax = int(box[start:end, 2].max())
        wmax = int(box[start:end, 3].max())
        resized.append(resize(flat, chunk, chunk_taps, hmax, wmax))
    return torch.cat(resized)[plan['unsort'].long()]


class Augment:
    """One batch from the workers, on the device: decode; train: crop, resize, flip, RandAugment; eval: resize
    the short side to img_size / crop_ratio, centre crop. Returns float images in 0..255, whole levels as PIL's,
    the labels, and the files no decoder could read (each replaced by the next image, as RobustDataset does)."""

    def __init__(self, img_size, train, mean, crop_ratio=0.95):
        if decode_jpeg is None:
            program = os.path.basename(sys.argv[0])
            sys.exit(f"{program}: error: --data_pipeline device needs a JPEG decoder: TorchCodec is not installed "
                     f"(or does not load) and this torchvision has none; use --data_pipeline workers")
        self.size = img_size
        self.train = train
        self.crop_ratio = crop_ratio
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's fill colour for RandAugment (img_mean)
        self.pil_decodes = 0  # JPEGs the device's decoder refused, decoded by PIL here (log.jsonl: pil_decodes)

    def decode(self, images, device):
        """{index: decoded image}, {index: why it is unreadable}: one batched call; if it fails, image by image on
        the device, then PIL for what the device refuses."""
        # Bytes are 1-d; what a worker's PIL decoded is (3, h, w) already.
        encoded = [i for i, image in enumerate(images) if image.dim() == 1]
        decoded = {i: image.to(device, non_blocking=True) for i, image in enumerate(images) if i not in encoded}
        errors = {}
        if device.type == 'cuda':
            # nvJPEG writes from its own stream into memory allocated on this one, which queued work may still
            # read: drain it first (pytorch/vision#9606: 134 of 200 batches corrupted on an H100 without this, 0
            # with it).
            torch.cuda.current_stream().record_event().synchronize()
        if not encoded:
            return decoded, errors
        with contextlib.suppress(RuntimeError):
            batch = decode_jpeg([images[i] for i in encoded], mode='RGB', device=device)
            return decoded | dict(zip(encoded, batch)), errors
        # nvJPEG refuses the whole list for one image it cannot take (e.g. its chroma subsampling).
        for i in encoded:
            try:
                decoded[i] = decode_jpeg(images[i], mode='RGB', device=device)
            except RuntimeError:
                self.pil_decodes += 1
                try:
                    pil = Image.open(io.BytesIO(images[i].numpy())).convert('RGB')
                except Exception as e:
                    # PIL raises OSError, SyntaxError, ValueError... for broken files.
                    errors[i] = e
                else:
                    # Outside the try: only the file's own fault counts against --max_bad_files, and a device
                    # error ends the run.
                    decoded[i] = chw(pil).to(device)
        return decoded, errors

    def boxes(self, params, hw):
        """Each image's box in its decoded pixels (top, left, height, width), the size it is resized to (height,
        width), and the first output row and column kept: (n, 4), (n, 2), (n, 2)."""
        if self.train:
            # timm's crop box, resized to size x size.
            box = params[:, :4]
            out = np.full_like(hw, self.size)
            first = np.zeros_like(hw)
            return box, out, first
        # torchvision's Resize(int) of the whole image (its short side to round(size / crop_ratio)), CenterCrop.
        short = round(self.size / self.crop_ratio)
        shortest = hw.min(1, keepdims=True)
        out = np.where(hw == shortest, short, (short * hw / shortest).astype(int))
        box = np.concatenate([np.zeros_like(hw), hw], 1)
        first = np.round((out - self.size) / 2.0)
        return box, out, first

    def host_arrays(self, images, params):
        """All the device needs from the host for a batch, for one copy (to_device), sorted by box area: where each
        decoded image lies in the flat batch (its start and strides), its box, output size and first output pixel,
        the order back (unsort), the flips, the fill colour, and in training each RandAugment slot's host_plan."""
        hw = np.array([image.shape[1:] for image in images], dtype=np.float64)
        box, out, first = self.boxes(params, hw)
        # Sorted by area, images of similar sizes share a resize chunk: less padding.
        order = np.argsort(box[:, 2] * box[:, 3], kind='stable')
        # Strides for CHW or HWC, as decoded.
        strides = np.array([image.stride() for image in images], dtype=np.float64)[order]
        starts = np.cumsum([0] + [image.numel() for image in images])
        arrays = dict(
            start=starts[order],
            stride_c=strides[:, 0],
            stride_y=strides[:, 1],
            stride_x=strides[:, 2],
            box=box[order],
            out=out[order],
            first=first[order],
            unsort=np.argsort(order),
            flip=params[:, 4] == 1,
            fill=self.fill,
        )
        if self.train:
            for slot, slot_arrays in host_plan(params, self.size).items():
                for key, value in slot_arrays.items():
                    arrays[f'{key}{slot}'] = value
        return arrays

    def __call__(self, batch, labels, device):
        flat, shapes, params, names = batch
        sizes = [int(np.prod(shape)) for shape in shapes]
        images = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]
        decoded, errors = self.decode(images, device)
        if not decoded:
            raise RuntimeError(f"no readable image in a batch: {names[0]} ({errors[0]})")
        # A copy: an unreadable image takes its replacement's draws.
        params = params.numpy().copy()
        labels, bad = replace_unreadable(decoded, errors, params, labels, names)
        images = [decoded[i] for i in range(len(images))]
        arrays = self.host_arrays(images, params)
        plan = to_device(arrays, device)
        x = resize_batch(images, arrays, plan, self.size)
        if not self.train:
            return x, labels, bad
        flips = plan['flip'].bool().view(-1, 1, 1, 1)
        x = torch.where(flips, x.flip(3), x)
        keys = ('op', 'table', 'factor', 'coefficients', 'geometric')
        for slot in range(SLOTS):
            # The ops some image drew, known on the host: a stage that no image needs is skipped.
            drawn = set(params[:, 5 + 2 * slot].astype(int).tolist()) - {-1}
            slot_plan = {key: plan[f'{key}{slot}'] for key in keys}
            x = rand_augment_slot(x, slot_plan, drawn, plan['fill'].float())
        return x, labels, bad


# ---------------------------------------------------------------- both paths: to the device, ahead of the step

def put(ready, stop, item):
    """Puts `item` on the `ready` queue, waiting for room for as long as the loop has not stopped."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def prepare_batches(batches, device, mean, std, memory_format, augment, ready, stop):
    """device_batches' helper thread: each batch to the device, augmented, normalized, with an event it is ready
    at; then None. What it raises goes on the queue, for the training loop to raise and report."""
    # The try covers the start: a failure to start (the device, the stream) is raised in the loop, not waited for.
    try:
        # A thread starts on device 0: this one works on `device`, on its own stream (None on the CPU: a no-op).
        stream = None
        if device.type == 'cuda':
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            # Through pinned memory: a tensor made from Python numbers on the device would wait for it.
            normalize = to_device(dict(mean=mean, std=std), device)
            shift = normalize['mean'].float().view(1, -1, 1, 1)
            scale = normalize['std'].float().view(1, -1, 1, 1)
            for images, labels, bad in batches:
                if augment:
                    images, labels, replaced = augment(images, labels, device)
                    bad = bad + replaced
                else:
                    images = images.to(device, non_blocking=True)
                # ToTensor's and Normalize's arithmetic.
                images = images.float().div_(255).sub_(shift).div_(scale)
                images = images.contiguous(memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                ready_event = None
                if stream is not None:
                    ready_event = stream.record_event()
                put(ready, stop, ((images, labels, bad), ready_event))
                if stop.is_set():
                    return
        put(ready, stop, None)
    except BaseException as e:
        put(ready, stop, e)


def device_batches(batches, device, mean, std, memory_format=torch.contiguous_format, augment=None, depth=2):
    """Batches on the device, normalized there (ToTensor + Normalize's arithmetic on uint8: 4x fewer bytes cross
    PCIe than fp32), prepared by a helper thread on a side stream while the training thread launches its steps,
    up to `depth` ahead (timm's PrefetchLoader, in a thread). `augment` (Augment) decodes and augments the bytes
    and draws of --data_pipeline device. The order of batches is the loader's; a failure in the helper (a dead
    worker, the loader's timeout, its own start) is raised here, in the loop."""
    ready = queue.Queue(depth)
    stop = threading.Event()
    # The loader's workers start here, in the training thread.
    batches = iter(batches)
    work = (batches, device, mean, std, memory_format, augment, ready, stop)
    helper = threading.Thread(target=prepare_batches, args=work, daemon=True)
    helper.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            batch, ready_event = item
            if ready_event is not None:
                # The step waits for this batch alone, and its tensors are the step's from now: the allocator
                # does not reuse their memory while the compute stream may still read them.
                torch.cuda.current_stream().wait_event(ready_event)
                for tensor in batch[:2]:
                    tensor.record_stream(torch.cuda.current_stream())
            yield batch
    except GeneratorExit:
        # The loop stopped early: the helper ends (at its next batch) before the loader is iterated again. A helper
        # that waits on a dead data worker would wait out --loader_timeout: the run is failing then, and the
        # helper, a daemon thread, goes with it.
        stop.set()
        with contextlib.suppress(Exception):
            # A data worker's death, raised here by torch's SIGCHLD handler: the run already reports the first.
            helper.join(timeout=HELPER_JOIN_TIMEOUT)
        raise
    finally:
        stop.set()
