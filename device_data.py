"""
The `device` data path (train.py --data_pipeline device): the data workers read each file's bytes and draw its
augmentation; the device decodes a batch of JPEGs in one call (nvJPEG on CUDA, libjpeg on the CPU) and crops,
resizes, flips and RandAugments the whole batch with tensor ops. The workers' path (timm's transforms on PIL
images) costs 3-5 ms of CPU per ImageNet image, which caps a 16-core node near 3,100 img/s; a worker here spends
0.18 ms an image (its bytes, the JPEG header, the draws).

Faithful to timm by construction where it can be: the draws are timm's own (RandomResizedCropAndInterpolation's
get_params, torchvision's flip, and timm's RandAugment with its ops recording their arguments instead of applying
them), made in timm's order from the same per-sample seed, so a sample gets the same crop, flip, ops and
magnitudes on both paths. The ops re-implement PIL's arithmetic (its cubic, fixed-point luma, truncations) on
batches; test_train.py measures each against timm's PIL output.

    dataset = ImageFolder(root, loader=read_file, transform=Draw(timm_train_transform))  # in the workers
    loader = DataLoader(RobustDataset(dataset), collate_fn=collate, ...)
    for images, labels, bad in device_batches(loader, device, mean, std, augment=Augment(224, True, mean)): ...
device_batches (both paths) copies each batch to the device on a side stream, one batch ahead, and normalizes it.
"""
import copy
import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import decode_jpeg

# ---------------------------------------------------------------- in the data workers: bytes and draws

OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
       'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
       'TranslateXRel', 'TranslateYRel']  # timm's RandAugment 'inc1' set, which --rand_augment selects
SLOTS = 2  # RandAugment's num_layers (timm's default 'n2'); a skipped op (its probability 0.5) records nothing


def read_file(path):
    """The file's bytes as a uint8 tensor: train.py's ImageFolder loader on this path (torchvision 0.29 deprecates
    its own read_file)."""
    with open(path, 'rb') as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def record(name, drawn, *level_args, **_):
    return drawn + [(name, level_args)]


def parts(timm_transform):
    """The crop, the flip and the RandAugment in timm's train transform (a Compose), by type."""
    kinds = (RandomResizedCropAndInterpolation, transforms.RandomHorizontalFlip, RandAugment)
    return [next(t for t in timm_transform.transforms if isinstance(t, kind)) for kind in kinds]


def gpu_decodable(header, data):
    """What nvJPEG takes: a baseline colour JPEG, whole (it ends with the EOI marker; a truncated file then goes
    to PIL, which raises, and the bad-file handling replaces it). Greyscale, CMYK, progressive, PNG: PIL."""
    return (header.format == 'JPEG' and header.mode == 'RGB' and 'progression' not in header.info
            and data[-2:].tolist() == [0xFF, 0xD9])


class Draw:
    """A worker's per-sample transform: the file's bytes (or, for what nvJPEG cannot take, PIL's decoded uint8
    image) and its augmentation's parameters, (top, left, height, width, flip, op, level, op, level), drawn as
    timm draws them (crop: python random; flip: torch; RandAugment: numpy, then python random). None: eval."""

    def __init__(self, timm_transform=None):
        self.crop, self.flip, self.rand_augment = parts(timm_transform) if timm_transform else (None,) * 3
        if self.rand_augment:
            self.rand_augment = copy.deepcopy(self.rand_augment)
            assert [op.name for op in self.rand_augment.ops] == OPS and self.rand_augment.num_layers == SLOTS
            for op in self.rand_augment.ops:  # timm's draws, unchanged; the recording replaces PIL's op
                op.aug_fn = functools.partial(record, op.name)

    def __call__(self, item):  # item: a file's bytes (uint8 tensor), or a PIL image (torchvision's datasets)
        header = item if isinstance(item, Image.Image) else Image.open(io.BytesIO(item.numpy()))  # no decoding yet
        if isinstance(item, Image.Image) or not gpu_decodable(header, item):  # decoded (or failing) before the
            item = torch.from_numpy(np.array(header.convert('RGB'))).permute(2, 0, 1).contiguous()  # draws, as timm
        params = torch.full((5 + 2 * SLOTS,), -1.0, dtype=torch.float64)
        if self.crop:
            params[:4] = torch.tensor(self.crop.get_params(header, self.crop.scale, self.crop.ratio))
            params[4] = float(torch.rand(1) < self.flip.p)  # torchvision's RandomHorizontalFlip, as timm calls it
            for slot, (name, level_args) in enumerate(self.rand_augment([])):  # float32 would round the levels
                params[5 + 2 * slot: 7 + 2 * slot] = torch.tensor([OPS.index(name), (level_args or (0,))[0]],
                                                                  dtype=torch.float64)
        return item, params


def collate(samples):
    """RobustDataset's (sample, label, bad) triples as ((bytes, shapes, params), labels, bad file names): the
    images' bytes in one flat tensor, which crosses from the worker in one piece of shared memory (a tensor
    for each would be one file descriptor each, which the file_descriptor sharing strategy runs out of)."""
    samples, labels, bad = zip(*samples)
    images, params = zip(*samples)
    flat = torch.cat([image.flatten() for image in images])
    return (flat, [tuple(image.shape) for image in images], torch.stack(params)), torch.tensor(labels), list(bad)


# ---------------------------------------------------------------- on the device: decode, crop, resize, flip, ops

def decode(images, device):
    """The encoded JPEGs in one call (one nvJPEG batch on CUDA); what the workers decoded is copied over. A JPEG
    that nvJPEG refuses though it passed gpu_decodable is decoded by PIL here instead."""
    encoded = [i for i, image in enumerate(images) if image.dim() == 1]
    try:
        decoded = dict(zip(encoded, decode_jpeg([images[i] for i in encoded], device=device))) if encoded else {}
    except RuntimeError:
        decoded = {i: Draw()(Image.open(io.BytesIO(images[i].numpy())))[0].to(device) for i in encoded}
    return [decoded[i] if i in decoded else image.to(device, non_blocking=True) for i, image in enumerate(images)]


def resize(image, size):
    """PIL's antialiased bicubic resize (a = -0.5, its support widened when shrinking), rounded to uint8 levels."""
    return F.interpolate(image[None].float(), size=size, mode='bicubic', antialias=True)[0].round_().clamp_(0, 255)


def blend(degenerate, x, factor):  # PIL's Image.blend, as ImageEnhance uses it: clipped, then truncated
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def luma(x):  # PIL's convert('L'): ITU-R 601-2 in 16-bit fixed point, exact in float32 (all sums < 2 ** 24)
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def point(x, table):  # PIL's Image.point: a lookup table (n, 3, 256) per image and channel
    return table.float().expand(len(x), 3, 256).gather(2, x.flatten(2).long()).view_as(x)


def auto_contrast(x):  # ImageOps.autocontrast: each channel stretched to 0..255, truncated, in float64 as PIL
    lo, hi = (t.double()[..., None] for t in x.flatten(2).aminmax(dim=2))
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = 255 / (hi - lo).clamp(min=1)
    return point(x, torch.where(hi > lo, (levels * scale - lo * scale).floor().clamp(0, 255), levels))


def equalize(x):  # ImageOps.equalize: PIL's integer arithmetic on each channel's histogram
    values = x.flatten(2).long()
    histogram = torch.zeros(*values.shape[:2], 256, dtype=torch.long, device=x.device)
    histogram.scatter_add_(2, values, torch.ones_like(values))
    step = (values.shape[2] - histogram.gather(2, values.amax(2, keepdim=True))) // 255  # all but the top level
    table = (step // 2 + histogram.cumsum(2) - histogram) // step.clamp(min=1)
    return point(x, torch.where(step > 0, table.clamp(max=255), torch.arange(256, device=x.device)))


def sharpness(x, factor):  # ImageEnhance.Sharpness: a blend with PIL's SMOOTH filter, which keeps the border
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel / 13, groups=3).round_()
    return blend(smooth, x, factor)


def affine(x, fill, *coefficients):
    """PIL's Image.transform(AFFINE, BICUBIC, fillcolor): output pixel centre (x, y) samples the input at (a x +
    b y + c, d x + e y + f) with PIL's cubic (a = -1, where torch's grid_sample has -0.75), edges clamped, and
    is `fill` where that falls outside. Coefficients are numbers or one per image; 16 gathers, one per tap."""
    n, c, h, w = x.shape
    a, b, c0, d, e, f = (torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(n).view(n, 1, 1)
                         for t in coefficients)
    row, col = torch.meshgrid(torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5,
                              indexing='ij')
    src_x, src_y = a * col + b * row + c0, d * col + e * row + f  # (n, h, w)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    taps = []
    for src in (src_x - 0.5, src_y - 0.5):
        base = src.floor()
        t = src - base
        taps.append((base, [-t + 2 * t ** 2 - t ** 3, 1 - 2 * t ** 2 + t ** 3, t + t ** 2 - t ** 3, t ** 3 - t ** 2]))
    (base_x, weight_x), (base_y, weight_y) = taps
    out, flat = torch.zeros_like(x), x.flatten(2)
    for i in range(4):
        y = (base_y + i - 1).clamp(0, h - 1)
        for j in range(4):
            index = (y * w + (base_x + j - 1).clamp(0, w - 1)).long().view(n, 1, -1).expand(-1, 3, -1)
            out += (weight_y[i] * weight_x[j])[:, None] * flat.gather(2, index).view_as(x)
    return torch.where(inside[:, None], out.clamp_(0, 255).floor_(), fill.view(1, 3, 1, 1))


def rotate(x, degrees, fill):  # PIL's Image.rotate about the centre: its inverse matrix, as it builds it
    angle = -degrees * math.pi / 180
    cos, sin, (cx, cy) = angle.cos(), angle.sin(), (x.shape[3] / 2, x.shape[2] / 2)
    return affine(x, fill, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# timm's RandAugment ops on a batch (x: n images in 0..255, v: each one's level argument, as timm's level_fn gave)
APPLY = {
    'AutoContrast': lambda x, v, fill: auto_contrast(x),
    'Equalize': lambda x, v, fill: equalize(x),
    'Invert': lambda x, v, fill: 255 - x,
    'Rotate': lambda x, v, fill: rotate(x, v, fill),
    'PosterizeIncreasing': lambda x, v, fill: x - x % 2 ** (8 - v.view(-1, 1, 1, 1)),  # PIL >= 12 refuses 0 bits
    'SolarizeIncreasing': lambda x, v, fill: torch.where(x < v.view(-1, 1, 1, 1), x, 255 - x),
    'SolarizeAdd': lambda x, v, fill: torch.where(x < 128, (x + v.view(-1, 1, 1, 1)).clamp_(max=255), x),
    'ColorIncreasing': lambda x, v, fill: blend(luma(x), x, v),
    'ContrastIncreasing': lambda x, v, fill: blend((luma(x).double().mean((1, 2, 3)) + 0.5).floor().float().view(
        -1, 1, 1, 1), x, v),
    'BrightnessIncreasing': lambda x, v, fill: blend(torch.zeros_like(x), x, v),
    'SharpnessIncreasing': lambda x, v, fill: sharpness(x, v),
    'ShearX': lambda x, v, fill: affine(x, fill, 1, v, 0, 0, 1, 0),
    'ShearY': lambda x, v, fill: affine(x, fill, 1, 0, 0, v, 1, 0),
    'TranslateXRel': lambda x, v, fill: affine(x, fill, 1, 0, v * x.shape[3], 0, 1, 0),
    'TranslateYRel': lambda x, v, fill: affine(x, fill, 1, 0, 0, 0, 1, v * x.shape[2]),
}


class Augment:
    """One batch from the workers, on the device: decode; train: crop, resize, flip, RandAugment; eval: resize
    the short side to img_size / crop_ratio, centre crop. Returns float images in 0..255, whole levels as PIL's."""

    def __init__(self, img_size, train, mean, crop_ratio=0.95):
        self.size, self.train, self.crop_ratio = img_size, train, crop_ratio
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's fill colour for RandAugment (img_mean)

    def __call__(self, batch, device):
        flat, shapes, params = batch
        images = [part.view(shape) for part, shape in zip(flat.split([math.prod(s) for s in shapes]), shapes)]
        images, size = decode(images, device), self.size
        if not self.train:  # torchvision's Resize(int) and CenterCrop, as train.py's workers apply them
            return torch.stack([self.center_crop(image) for image in images])
        boxes = params[:, :4].long().tolist()
        x = torch.stack([resize(image[:, i:i + h, j:j + w], (size, size)) for image, (i, j, h, w) in
                         zip(images, boxes)])
        to_device = functools.partial(torch.Tensor.to, device=device, non_blocking=True)  # a copy, not a sync
        flipped = to_device((params[:, 4] == 1).nonzero()[:, 0])
        x[flipped] = x[flipped].flip(3)
        fill = to_device(torch.tensor(self.fill, dtype=x.dtype))
        for slot in range(SLOTS):  # each op on the images that drew it, with each one's level
            ops, levels = params[:, 5 + 2 * slot], params[:, 6 + 2 * slot].float()
            for op in ops.unique().long().tolist():  # params stay on the host: no device sync
                if op >= 0:
                    chosen = (ops == op).nonzero()[:, 0]
                    on_device = to_device(chosen)
                    x[on_device] = APPLY[OPS[op]](x[on_device], to_device(levels[chosen]), fill)
        return x

    def center_crop(self, image):
        (h, w), short = image.shape[1:], round(self.size / self.crop_ratio)
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        top, left = (int(round((s - self.size) / 2.0)) for s in size)
        return resize(image, size)[:, top:top + self.size, left:left + self.size]


# ---------------------------------------------------------------- both paths: to the device, one batch ahead

def device_batches(batches, device, mean, std, memory_format=torch.contiguous_format, augment=None):
    """Batches on the device, normalized there, one ahead (timm's PrefetchLoader, for our 3-item batches): uint8
    crosses PCIe, 4x fewer bytes than fp32, on a side stream under the step; ToTensor + Normalize's arithmetic.
    `augment` (device_data.Augment) decodes and augments the bytes and draws of --data_pipeline device there."""
    stream = torch.cuda.Stream(device) if device.type == 'cuda' else None
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
    ahead = None
    for images, labels, *rest in batches:
        with torch.cuda.stream(stream):  # a no-op for None, on the CPU
            images = augment(images, device) if augment else images.to(device, non_blocking=True)
            images = images.float().div_(255).sub_(mean).div_(std)
            batch = (images.contiguous(memory_format=memory_format), labels.to(device, non_blocking=True), *rest)
        if ahead is not None:
            yield ahead
        if stream:  # the compute stream waits for this copy after step n, and owns its memory from then on
            torch.cuda.current_stream().wait_stream(stream)
            batch[0].record_stream(torch.cuda.current_stream())
        ahead = batch
    yield from [] if ahead is None else [ahead]
