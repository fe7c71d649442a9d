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
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

# The one JPEG decoder: TorchCodec's where it loads, else torchvision's (deprecated there since 0.29), the same call.
# An installed TorchCodec may not load: one built for another torch fails to load its library (OSError), an older one
# without FFmpeg raises RuntimeError, and one older still has no decode_jpeg (ImportError).
try:
    from torchcodec.decoders import decode_jpeg
except (ImportError, OSError, RuntimeError):
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        decode_jpeg = None

# ---------------------------------------------------------------- in the data workers: bytes and draws

OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
       'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
       'TranslateXRel', 'TranslateYRel']  # timm's RandAugment 'inc1' set, which --rand_augment selects
SLOTS = 2  # RandAugment's num_layers (timm's default 'n2'); a skipped op (its probability 0.5) records nothing
TABLE, BLEND, GEOMETRIC = (0, 1, 2, 4, 5, 6), (7, 8, 9, 10), (3, 11, 12, 13, 14)  # how each op runs on a batch
CHUNK = 2 ** 25  # pixels of padded crops resized at once: bounds the resize's memory (about 0.8 GB) on big images
HELPER_JOIN_TIMEOUT = 10  # seconds a closed device_batches waits for its helper thread to end


def read_file(path):
    """The file's name and bytes (a uint8 tensor): train.py's ImageFolder loader on this path."""
    with open(path, 'rb') as f:
        return path, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def record(name, drawn, *level_args, **_):
    return drawn + [(name, level_args)]


def parts(timm_transform):
    """The crop, the flip and the RandAugment in timm's train transform (a Compose), by type."""
    kinds = (RandomResizedCropAndInterpolation, transforms.RandomHorizontalFlip, RandAugment)
    return [next(t for t in timm_transform.transforms if isinstance(t, kind)) for kind in kinds]


def gpu_decodable(header, data):
    """What the device decodes: a baseline colour JPEG, whole (it ends with the EOI marker; a truncated file then
    goes to PIL, which raises, and the bad-file handling replaces it), stored upright (TorchCodec would apply an
    EXIF rotation that PIL and timm do not). Greyscale, CMYK, progressive, rotated, PNG: PIL, in the worker."""
    return (header.format == 'JPEG' and header.mode == 'RGB' and 'progression' not in header.info
            and data[-2:].tolist() == [0xFF, 0xD9] and header.getexif().get(0x0112, 1) == 1)


class Draw:
    """A worker's per-sample transform: (the bytes, or PIL's uint8 image where the device does not decode; the
    draws (top, left, height, width, flip, op, level, op, level) as timm makes them; the name). None: eval."""

    def __init__(self, timm_transform=None):
        self.crop, self.flip, self.rand_augment = parts(timm_transform) if timm_transform else (None,) * 3
        if self.rand_augment:
            self.rand_augment = copy.deepcopy(self.rand_augment)
            assert [op.name for op in self.rand_augment.ops] == OPS and self.rand_augment.num_layers == SLOTS
            for op in self.rand_augment.ops:  # timm's draws, unchanged; the recording replaces PIL's op
                op.aug_fn = functools.partial(record, op.name)

    def __call__(self, item):  # read_file's (name, bytes), or a PIL image (torchvision's datasets)
        name, item = item if isinstance(item, tuple) else ('', item)
        header = item if isinstance(item, Image.Image) else Image.open(io.BytesIO(item.numpy()))  # no decoding yet
        if isinstance(item, Image.Image) or not gpu_decodable(header, item):  # decoded (or failing) before the
            item = torch.from_numpy(np.array(header.convert('RGB'))).permute(2, 0, 1).contiguous()  # draws, as timm
        params = torch.full((5 + 2 * SLOTS,), -1.0, dtype=torch.float64)
        if self.crop:
            params[:4] = torch.tensor(self.crop.get_params(header, self.crop.scale, self.crop.ratio))
            params[4] = float(torch.rand(1) < self.flip.p)  # torchvision's RandomHorizontalFlip, as timm calls it
            for slot, (op, level_args) in enumerate(self.rand_augment([])):  # float32 would round the levels
                params[5 + 2 * slot: 7 + 2 * slot] = torch.tensor([OPS.index(op), (level_args or (0,))[0]],
                                                                  dtype=torch.float64)
        return item, params, name


def collate(samples):
    """RobustDataset's (sample, label, bad) triples as ((bytes, shapes, params, names), labels, bad file names): the
    images' bytes in one flat tensor, which crosses from the worker in one piece of shared memory (a tensor
    for each would be one file descriptor each, which the file_descriptor sharing strategy runs out of)."""
    samples, labels, bad = zip(*samples)
    images, params, names = zip(*samples)
    flat = torch.cat([image.flatten() for image in images])
    return (flat, [tuple(i.shape) for i in images], torch.stack(params), list(names)), torch.tensor(labels), list(bad)


# ---------------------------------------------------------------- on the device: decode, crop, resize, flip, ops

def to_device(arrays, device):
    """A dict of numpy arrays as device tensors (float64), through one host-to-device copy from pinned memory:
    one launch, and no wait for the device."""
    flat = torch.from_numpy(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays.values()]))
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else flat
    return {k: part.view(np.shape(a)) for (k, a), part in zip(arrays.items(), flat.split([np.size(a) for a in
                                                                                          arrays.values()]))}


def resize_taps(in_size, out_size, first, count, ksize):
    """PIL's bicubic resize coefficients (precompute_coeffs, then normalize_coeffs_8bpc's 22-bit fixed point) for
    outputs first..first+count of each image: tap positions and weights (n, count, ksize), from PIL's own double
    arithmetic, operation for operation."""
    scale = (in_size / out_size)[:, None, None]
    filterscale = scale.clamp(min=1)
    support = 2.0 * filterscale
    center = (first[:, None, None] + torch.arange(count, device=scale.device)[:, None] + 0.5) * scale
    x = (center - support + 0.5).trunc().clamp(min=0) + torch.arange(ksize, device=scale.device)
    t = ((x - center + 0.5) * (1.0 / filterscale)).abs()
    w = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, (((t - 5) * t + 8) * t - 4) * -0.5)
    w = w * ((t < 2) & (x < (center + support + 0.5).trunc().minimum(in_size[:, None, None])))
    w = w / w.sum(2, keepdim=True)
    return x.long(), (w * 2 ** 22 + (w.sign() * 0.5)).trunc() / 2 ** 22


def dense(taps, in_max):  # taps as (n, count, in_max) matrices; room for taps past the end (their weights are 0)
    x, w = taps
    return torch.zeros(*w.shape[:2], in_max + w.shape[2], dtype=w.dtype, device=w.device).scatter_add_(
        2, x, w)[:, :, :in_max]


def resize(flat, plan, taps, hmax, wmax):
    """Each image's box of the flat decoded batch resized as PIL resizes it (horizontal pass, rounded to uint8,
    vertical pass; a matmul with PIL's coefficients is PIL's sum exactly, fp64 holding every partial sum), padded
    to the largest box (hmax, wmax), where the weights are 0. Returns (n, 3, size, size) in whole levels."""
    n, device = len(plan['box']), flat.device
    top, left, h, w = plan['box'].long().T
    start, stride_c, stride_y, stride_x = (plan[k].long() for k in ('start', 'stride_c', 'stride_y', 'stride_x'))
    rows = (top[:, None] + torch.arange(hmax, device=device).minimum(h[:, None] - 1)) * stride_y[:, None]
    cols = (left[:, None] + torch.arange(wmax, device=device).minimum(w[:, None] - 1)) * stride_x[:, None]
    planes = start[:, None] + torch.arange(3, device=device) * stride_c[:, None]
    crops = flat[planes[:, :, None, None] + rows[:, None, :, None] + cols[:, None, None, :]].double()
    across = crops.view(n, 3 * hmax, wmax) @ dense(taps[0], wmax).transpose(1, 2)
    across = (across + 0.5).floor_().clamp_(0, 255).view(n, 3, hmax, -1)
    return (dense(taps[1], hmax)[:, None] @ across + 0.5).floor_().clamp_(0, 255).float()


def blend(degenerate, x, factor):  # PIL's Image.blend, as ImageEnhance uses it: clipped, then truncated
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def luma(x):  # PIL's convert('L'): ITU-R 601-2 in 16-bit fixed point, exact in float32 (all sums < 2 ** 24)
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def auto_contrast(x):  # ImageOps.autocontrast's tables: each channel stretched to 0..255, truncated, in float64
    lo, hi = (t.double()[..., None] for t in x.flatten(2).aminmax(dim=2))
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, (levels * scale - lo * scale).floor().clamp(0, 255), levels)


def equalize(x):  # ImageOps.equalize's tables: PIL's integer arithmetic on each channel's histogram
    values = x.flatten(2).long()
    histogram = torch.zeros(*values.shape[:2], 256, dtype=torch.long, device=x.device)
    histogram.scatter_add_(2, values, torch.ones(1, dtype=torch.long, device=x.device).expand_as(values))
    step = (values.shape[2] - histogram.gather(2, values.amax(2, keepdim=True))) // 255  # all but the top level
    table = (step // 2 + histogram.cumsum(2) - histogram) // step.clamp(min=1)
    return torch.where(step > 0, table.clamp(max=255), torch.arange(256, device=x.device)).double()


def smooth(x):  # PIL's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13, border kept), for ImageEnhance.Sharpness:
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # separable sums, exact in float32: no rounding tie
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # can occur (13 is odd), so PIL's float kernel rounds
    out = x.clone()  # the same way
    out[:, :, 1:-1, 1:-1] = ((box + 4 * x[:, :, 1:-1, 1:-1]) / 13).round_()
    return out


@functools.cache
def pil_cubic(device):
    """PIL's cubic (a = -1) as the matrix that turns [1 t t^2 t^3] into the 4 taps' weights, (4, 4, 1). Made once a
    device: a tensor made from Python numbers on the device is a copy from pageable memory, which waits for it."""
    return torch.tensor([[0, -1, 2, -1], [1, 0, -2, 1], [0, 1, 1, -1], [0, 0, -1, 1]], device=device)[..., None]


def affine(x, fill, coefficients):
    """PIL's Image.transform(AFFINE, BICUBIC, fillcolor) per image: output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f), coefficients (n, 6), with PIL's cubic (a = -1, where torch's grid_sample has
    -0.75), edges clamped, and is `fill` where that falls outside. 4 gathers of 4 taps each."""
    n, _, h, w = x.shape
    a, b, c, d, e, f = coefficients.float().T[..., None]
    pixel = torch.arange(h * w, device=x.device)
    col, row = pixel % w + 0.5, pixel // w + 0.5
    src_x, src_y = a * col + b * row + c, d * col + e * row + f  # (n, h * w)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    cubic = pil_cubic(x.device)
    taps = []  # per axis: the 4 taps' positions and weights, (n, 4, h * w): [1 t t^2 t^3] x PIL's cubic
    for src, size in ((src_x - 0.5, w), (src_y - 0.5, h)):
        base = src.floor()
        powers = (src - base)[:, None] ** torch.arange(4, device=x.device)[:, None]
        taps.append(((base[:, None] + torch.arange(-1, 3, device=x.device)[:, None]).clamp_(0, size - 1),
                     (powers[:, None] * cubic).sum(2)))
    (x_index, x_weight), (y_index, y_weight) = taps
    out, flat, y_index = torch.zeros_like(x.flatten(2)), x.flatten(2), y_index * w
    for i in range(4):  # one row of 4 taps at a time: 4x less memory than all 16 at once
        index = (y_index[:, i:i + 1] + x_index).long().view(n, 1, -1).expand(-1, 3, -1)
        out += (flat.gather(2, index).view(n, 3, 4, -1) * (y_weight[:, i:i + 1] * x_weight)[:, None]).sum(2)
    return torch.where(inside[:, None], out.clamp_(0, 255).floor_(), fill.view(1, 3, 1)).view_as(x)


def host_plan(params, size):
    """What the ops need, from the draws, on the host (numpy, in double as PIL): each slot's lookup table (identity
    where the image drew none), blend factor (1 where none), affine coefficients, and which images transform."""
    n, plan, levels = len(params), {}, np.arange(256.0)
    for slot in range(SLOTS):
        op, v = params[:, 5 + 2 * slot], params[:, 6 + 2 * slot]
        o, u = op[:, None], v[:, None]  # Invert, Posterize (PIL >= 12 refuses 0 bits), Solarize, SolarizeAdd
        table = np.where(o == 2, 255 - levels, levels)
        table = np.where(o == 4, levels - levels % 2 ** (8 - np.where(o == 4, u, 0)), table)
        table = np.where(o == 5, np.where(levels < u, levels, 255 - levels), table)
        table = np.where(o == 6, np.where(levels < 128, np.minimum(levels + u, 255), levels), table)
        angle = -np.radians(np.where(op == 3, v, 0))  # PIL's rotate: its inverse matrix, about the centre
        cos, sin, zero, one, c = np.cos(angle).round(15), np.sin(angle).round(15), 0 * v, 1 + 0 * v, size / 2
        coefficients = np.stack([one, zero, zero, zero, one, zero], 1)
        for k, row in {3: (cos, sin, cos * -c + sin * -c + c, -sin, cos, -sin * -c + cos * -c + c),
                       11: (one, v, zero, zero, one, zero), 12: (one, zero, zero, v, one, zero),
                       13: (one, zero, v * size, zero, one, zero), 14: (one, zero, zero, zero, one, v * size)}.items():
            coefficients[op == k] = np.stack(row, 1)[op == k]
        plan[slot] = dict(op=op, table=table, factor=np.where(np.isin(op, BLEND), v, 1.0), coefficients=coefficients,
                          geometric=np.flatnonzero(np.isin(op, GEOMETRIC)))
    return plan


def rand_augment_slot(x, slot, drawn, fill):
    """One RandAugment layer over the batch, each image's own op in three batched stages (tables, blends,
    geometry), which leave an image that drew another op unchanged. `drawn` (host): which ops some image drew."""
    op = slot['op'][:, None, None]
    if drawn & set(TABLE):  # AutoContrast and Equalize's tables depend on the image: made on the device
        table = slot['table'][:, None].expand(-1, 3, -1)
        table = torch.where(op == 0, auto_contrast(x), table) if 0 in drawn else table
        table = torch.where(op == 1, equalize(x), table) if 1 in drawn else table
        x = table.float().gather(2, x.flatten(2).long()).view_as(x)
    if drawn & set(BLEND):  # Color, Contrast, Brightness, Sharpness: one blend, each image with its degenerate
        grey = luma(x)
        mean = (grey.double().mean((1, 2, 3), keepdim=True) + 0.5).floor().float()
        op = op[..., None]
        degenerate = torch.where(op == 7, grey, torch.where(op == 8, mean, smooth(x) if 10 in drawn else 0))
        x = blend(torch.where(op == 9, 0, degenerate), x, slot['factor'].float())
    if len(slot['geometric']):
        geometric = slot['geometric'].long()
        x = x.index_copy(0, geometric, affine(x[geometric], fill, slot['coefficients'][geometric]))
    return x


class Augment:
    """One batch from the workers, on the device: decode; train: crop, resize, flip, RandAugment; eval: resize
    the short side to img_size / crop_ratio, centre crop. Returns float images in 0..255, whole levels as PIL's,
    the labels, and the files no decoder could read (each replaced by the next image, as RobustDataset does)."""

    def __init__(self, img_size, train, mean, crop_ratio=0.95):
        if decode_jpeg is None:
            sys.exit(f"{os.path.basename(sys.argv[0])}: error: --data_pipeline device needs a JPEG decoder: TorchCodec "
                     f"is not installed (or does not load) and this torchvision has none; use --data_pipeline workers")
        self.size, self.train, self.crop_ratio = img_size, train, crop_ratio
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's fill colour for RandAugment (img_mean)
        self.pil_decodes = 0  # JPEGs the device's decoder refused, decoded by PIL here (log.jsonl: pil_decodes)

    def decode(self, images, device):
        """{index: decoded image}, {index: why it is unreadable}: one batched call; if it fails, image by image on
        the device, then PIL for what the device refuses."""
        encoded = [i for i, image in enumerate(images) if image.dim() == 1]
        decoded, errors = {i: x.to(device, non_blocking=True) for i, x in enumerate(images) if i not in encoded}, {}
        if device.type == 'cuda':  # nvJPEG writes from its own stream into memory allocated on this one, which
            torch.cuda.current_stream().record_event().synchronize()  # queued work may still read: drain it first
            # (pytorch/vision#9606: 134 of 200 batches corrupted on an H100 without this, 0 with it)
        with contextlib.suppress(RuntimeError):
            return decoded | dict(zip(encoded, decode_jpeg([images[i] for i in encoded], mode='RGB', device=device)
                                      if encoded else [])), errors
        for i in encoded:
            try:
                decoded[i] = decode_jpeg(images[i], mode='RGB', device=device)
            except RuntimeError:
                self.pil_decodes += 1
                try:
                    pil = Image.open(io.BytesIO(images[i].numpy())).convert('RGB')
                except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                    errors[i] = e
                else:  # only the file's own fault counts against --max_bad_files: a device error ends the run
                    decoded[i] = torch.from_numpy(np.array(pil)).permute(2, 0, 1).to(device)
        return decoded, errors

    def __call__(self, batch, labels, device):
        flat, shapes, params, names = batch
        images = [part.view(shape) for part, shape in zip(flat.split([int(np.prod(s)) for s in shapes]), shapes)]
        decoded, errors = self.decode(images, device)
        if not decoded:
            raise RuntimeError(f"no readable image in a batch: {names[0]} ({errors[0]})")
        params, bad = params.numpy().copy(), []
        labels = labels.clone() if errors else labels
        for i in sorted(errors):  # replaced by the next readable image, with its draws and label
            j = next(k % len(images) for k in range(i, i + len(images)) if k % len(images) in decoded)
            decoded[i], params[i], labels[i] = decoded[j], params[j], labels[j]
            bad.append(f"{names[i]} (device decode: {str(errors[i]).splitlines()[0]})")
        images = [decoded[i] for i in range(len(images))]
        hw = np.array([image.shape[1:] for image in images], dtype=np.float64)
        if self.train:  # timm's crop box, resized to size x size
            box, out, first = params[:, :4], np.full_like(hw, self.size), np.zeros_like(hw)
        else:  # torchvision's Resize(int) of the whole image (short side to round(size / crop_ratio)), CenterCrop
            short, shortest = round(self.size / self.crop_ratio), hw.min(1, keepdims=True)
            out = np.where(hw == shortest, short, (short * hw / shortest).astype(int))
            box, first = np.concatenate([np.zeros_like(hw), hw], 1), np.round((out - self.size) / 2.0)
        order = np.argsort(box[:, 2] * box[:, 3], kind='stable')  # similar sizes share a chunk: less padding
        box, out = box[order], out[order]
        chunks = [0]  # [start, end) of each chunk, in sorted order
        for k in range(1, len(order) + 1):
            if k - chunks[-1] > 1 and 3 * (k - chunks[-1]) * box[chunks[-1]:k, 2:].max(0).prod() > CHUNK:
                chunks.append(k - 1)
        chunks.append(len(order))
        strides = np.array([image.stride() for image in images], dtype=np.float64)[order]  # CHW or HWC, as decoded
        plan = to_device(dict(
            start=np.cumsum([0] + [image.numel() for image in images])[order], stride_c=strides[:, 0],
            stride_y=strides[:, 1], stride_x=strides[:, 2], box=box, out=out, first=first[order],
            unsort=np.argsort(order), flip=params[:, 4] == 1, fill=self.fill, **{
                f'{k}{slot}': v for slot, p in (host_plan(params, self.size) if self.train else {}).items()
                for k, v in p.items()}), device)
        flat = torch.cat([image.as_strided((image.numel(),), (1,)) for image in images])  # views, in memory order
        taps = [resize_taps(plan['box'][:, 2 + i], plan['out'][:, i], plan['first'][:, i], self.size, 2 * int(
            np.ceil(2 * max(1, (box[:, 2 + i] / out[:, i]).max()))) + 1) for i in (1, 0)]  # across, down
        resized = [resize(flat, {k: plan[k][a:b] for k in ('start', 'stride_c', 'stride_y', 'stride_x', 'box')},
                          [(x[a:b], w[a:b]) for x, w in taps], int(box[a:b, 2].max()), int(box[a:b, 3].max()))
                   for a, b in zip(chunks, chunks[1:])]
        x = torch.cat(resized)[plan['unsort'].long()]
        if not self.train:
            return x, labels, bad
        x = torch.where(plan['flip'].bool().view(-1, 1, 1, 1), x.flip(3), x)
        for slot in range(SLOTS):
            drawn = set(params[:, 5 + 2 * slot].astype(int).tolist()) - {-1}
            x = rand_augment_slot(x, {k: plan[f'{k}{slot}'] for k in ('op', 'table', 'factor', 'coefficients',
                                                                      'geometric')}, drawn, plan['fill'].float())
        return x, labels, bad


# ---------------------------------------------------------------- both paths: to the device, ahead of the step

def device_batches(batches, device, mean, std, memory_format=torch.contiguous_format, augment=None, depth=2):
    """Batches on the device, normalized there (ToTensor + Normalize's arithmetic on uint8: 4x fewer bytes cross
    PCIe than fp32), prepared by a helper thread on a side stream while the training thread launches its steps,
    up to `depth` ahead (timm's PrefetchLoader, in a thread). `augment` (Augment) decodes and augments the bytes
    and draws of --data_pipeline device. The order of batches is the loader's; a failure in the helper (a dead
    worker, the loader's timeout, its own start) is raised here, in the loop."""
    ready, stop, batches = queue.Queue(depth), threading.Event(), iter(batches)  # iter: the workers start here

    def put(item):
        while not stop.is_set():
            try:
                return ready.put(item, timeout=0.1)
            except queue.Full:
                continue

    def prepare():
        try:  # from its first line: a failure to start (the device, the stream) is raised in the loop, not waited for
            stream = None
            if device.type == 'cuda':  # a thread starts on device 0: this one works on `device`, on its own stream
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):  # a no-op for None, on the CPU
                # through pinned memory: a tensor made from Python numbers on the device would wait for it
                normalize = to_device(dict(mean=mean, std=std), device)
                shift = normalize['mean'].float().view(1, -1, 1, 1)
                scale = normalize['std'].float().view(1, -1, 1, 1)
                for images, labels, bad in batches:
                    if augment:
                        images, labels, replaced = augment(images, labels, device)
                        bad = bad + replaced
                    else:
                        images = images.to(device, non_blocking=True)
                    images = images.float().div_(255).sub_(shift).div_(scale).contiguous(memory_format=memory_format)
                    batch = (images, labels.to(device, non_blocking=True), bad)
                    put((batch, stream.record_event() if stream else None))
                    if stop.is_set():
                        return
            put(None)
        except BaseException as e:  # raised in the training loop, which reports it
            put(e)

    helper = threading.Thread(target=prepare, daemon=True)
    helper.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            batch, ready_event = item
            if ready_event is not None:  # the step waits for this batch alone; its tensors are the step's from now
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
