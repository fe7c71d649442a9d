"""
USI: "Solving ImageNet: a Unified Scheme for Training any Backbone to Top Results" (Ridnik et al., 2022).
One fixed recipe plus vanilla knowledge distillation from a strong teacher, for any timm backbone.

    python train.py --model resnet18 --data fashion-mnist --teacher none --img_size 32     # one process
    torchrun --nproc_per_node=8 train.py --model resnet50 --data /path/to/imagenet         # 8 GPUs, DDP

Every hyperparameter below is a constant equal to the paper's Table 1 (or the authors' public code where
the paper is silent), and every one can be overridden: --batch_size 256, --batch_size=256, --batch-size 256.
Importing this file runs nothing: bench.py and the tests reuse its pieces.
"""
import argparse
import contextlib
import gzip
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets, transforms

from distill import chance_threshold, kd_loss, load_teacher, prepare_teacher

# -----------------------------------------------------------------------------
# model and data
MODEL = 'resnet50'                # student backbone, any timm name (paper: "any backbone")
DATA = ''                         # ImageFolder root with train/ and val/, or 'fashion-mnist' / 'cifar10'
DATA_DIR = './data'               # where torchvision datasets are downloaded / found
TRAIN_SUBSET = 0                  # train on a fixed random subset of this many images (0: all); for CPU runs
IMG_SIZE = 224                    # train and test resolution (Table 1: 224 / 224)
TEST_CROP_RATIO = 0.95            # eval: resize short side to round(224 / 0.95), center-crop 224 (Table 1)
# teacher and KD
TEACHER = 'tresnet_v2_l'          # TResNet-L, 83.9% top-1 (Table 1); 'none' trains without KD
TEACHER_CHECKPOINT = ''           # local teacher weights (timm checkpoint or train.py's best.pt); '' = hub
ALPHA_KD = 5.0                    # KD weight (Table 1, ablated in Table 6); 'inf' = teacher only, no CE
KD_TAU = 1.0                      # KD temperature (Table 1, ablated in Table 7)
# optimization
EPOCHS = 300                      # Table 1
BATCH_SIZE = 1024                 # global batch, split over processes (Table 1: 512 to 3456); 'auto' on CUDA
LR = 2e-3                         # peak one-cycle lr, not scaled with the batch (Table 1)
WEIGHT_DECAY = 2e-2               # AdamW decoupled decay (Table 1), on weights only, not biases or norms
PCT_START = 0.2                   # share of the one-cycle spent rising (authors' public code)
EMA_DECAY = 0.99996               # per-step EMA of the weights (authors' public code), with a warmup
# augmentation
RAND_AUGMENT = 'rand-m7-mstd0.5-inc1'  # RandAugment m7, mstd 0.5 (Table 1; 'inc1' from the authors' code)
MIXUP = 0.8                       # mixup alpha (Table 1)
CUTMIX = 1.0                      # cutmix alpha (Table 1); one of the two per batch, probability 0.5 each
AUG_REPEATS = 3                   # repeated augmentation (Table 1): each chosen image 3x per epoch
# system
WORKERS = min(8, os.cpu_count())  # data-loading processes per training process
COMPILE = True                    # torch.compile the student and teacher (CUDA only)
EVAL_EVERY = 1                    # validate every N epochs (and always after the last)
LOG_EVERY = 50                    # print a line every N steps
OUT_DIR = 'out'                   # log.jsonl, last.pt, best.pt
RESUME = False                    # continue from OUT_DIR/last.pt
SEED = 0                          # base seed; rank r uses SEED + r
# surviving clusters: preemption, kills, bad files, hung workers
CKPT_MINUTES = 30.0               # also write last.pt mid-epoch this often: a kill loses at most this much
CHECK_EVERY = 10                  # steps between the ranks' agreement: signals, checkpoints, a NaN loss
LOADER_TIMEOUT = 300              # seconds a batch may take before a hung data-loading worker is an error
MAX_BAD_FILES = 0.01              # share of unreadable training files replaced before the dataset is broken
CONFIG_KEYS = [k for k, v in list(globals().items()) if k.isupper() and isinstance(v, (bool, int, float, str))]
# must be > 0 (>= 0 for the rest): a bad value is stopped here, not 300 epochs later
POSITIVE = {'EPOCHS', 'BATCH_SIZE', 'IMG_SIZE', 'LR', 'KD_TAU', 'EVAL_EVERY', 'LOG_EVERY', 'AUG_REPEATS',
            'TEST_CROP_RATIO', 'CHECK_EVERY'}
# what --resume may change (paths and system settings); every other flag fixes the recipe and must match
FREE_KEYS = {'data', 'data_dir', 'teacher_checkpoint', 'workers', 'compile', 'eval_every', 'log_every', 'out_dir',
             'resume', 'ckpt_minutes', 'check_every', 'loader_timeout', 'max_bad_files'}


def parse_bool(s):
    if s.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got '{s}'")
    return s.lower() in ('1', 'true', 'yes')


def batch_size_type(s):
    return s if s == 'auto' else int(s)


batch_size_type.__name__ = 'int'  # argparse's message then reads "invalid int value"


def get_config(argv):
    """The constants above, overridden by argv; returns a namespace with lowercase names."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], allow_abbrev=False)
    parser.error = lambda msg: sys.exit(f"train.py: error: {msg}")  # one line, not usage + error
    for key in CONFIG_KEYS:
        default, name = globals()[key], key.lower()
        flags = sorted({f'--{name}', f"--{name.replace('_', '-')}"})
        if isinstance(default, bool):  # bare --resume, or --resume=1 / --compile 0
            parser.add_argument(*flags, dest=name, type=parse_bool, nargs='?', const=True, default=default)
        else:  # the batch may also be 'auto': 0.85 of the largest that fits, as the paper advises
            kind = batch_size_type if key == 'BATCH_SIZE' else type(default)
            parser.add_argument(*flags, dest=name, type=kind, default=default)
    cfg = parser.parse_args(argv)
    for key in CONFIG_KEYS:
        value = getattr(cfg, key.lower())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value) or value < 0 or (key in POSITIVE and value == 0):
                parser.error(f"--{key.lower()} must be {'> 0' if key in POSITIVE else '>= 0'}, got {value}")
    if not cfg.data:
        parser.error("--data is required: an ImageFolder root with train/ and val/, fashion-mnist or cifar10")
    if cfg.teacher.lower() == 'none':
        if math.isinf(cfg.alpha_kd):
            parser.error("--alpha_kd inf trains on the teacher alone; it needs a --teacher")
        cfg.teacher, cfg.alpha_kd = 'none', 0.0
    return cfg


class Fail(Exception):
    """A bad input or state: main() prints its message as one line and exits non-zero, no traceback."""


# -----------------------------------------------------------------------------
# data

def fashion_mnist_from_debian(root, src='/usr/share/datasets/fashion-mnist'):
    """Unpack Debian's dataset-fashion-mnist into the layout torchvision reads, so no download is needed.
    (The Debian files are recompressed, so torchvision's own download/checksum path cannot use them.)"""
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    names = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
    if all(os.path.exists(os.path.join(raw, n)) for n in names) or not os.path.isdir(src):
        return
    os.makedirs(raw, exist_ok=True)
    for n in names:  # a temp file per process: runs started side by side must not write into each other's
        tmp = os.path.join(raw, f'{n}.{os.getpid()}.tmp')
        with gzip.open(os.path.join(src, n + '.gz')) as f, open(tmp, 'wb') as out:
            shutil.copyfileobj(f, out)
        os.replace(tmp, os.path.join(raw, n))


def to_rgb(img):
    return img.convert('RGB')  # grayscale datasets become 3-channel, as every timm backbone expects


def student_normalization(model_name):
    """The (mean, std) the student's own timm config uses: its loader normalizes the images with them."""
    data_cfg = timm.get_pretrained_cfg(model_name)
    return (data_cfg.mean, data_cfg.std) if data_cfg else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def make_datasets(cfg, mean, std):
    """(train_set, val_set, num_classes) with the USI train transform and the 0.95-crop eval transform."""
    train_tf = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.rand_augment,
                                interpolation='bicubic', scale=(0.08, 1.0), hflip=0.5, mean=mean, std=std)
    val_tf = transforms.Compose([
        transforms.Resize(round(cfg.img_size / cfg.test_crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.img_size), transforms.ToTensor(), transforms.Normalize(mean, std)])
    if cfg.data in ('fashion-mnist', 'cifar10'):
        builder = datasets.FashionMNIST if cfg.data == 'fashion-mnist' else datasets.CIFAR10
        if cfg.data == 'fashion-mnist':
            fashion_mnist_from_debian(cfg.data_dir)
            train_tf, val_tf = (transforms.Compose([to_rgb, t]) for t in (train_tf, val_tf))
        try:
            train_set = builder(cfg.data_dir, train=True, transform=train_tf, download=True)
            val_set = builder(cfg.data_dir, train=False, transform=val_tf, download=True)
        except Exception as e:
            raise Fail(f"could not find or download {cfg.data} into {cfg.data_dir}: {str(e).splitlines()[0]}")
    else:
        for split in ('train', 'val'):
            if not os.path.isdir(os.path.join(cfg.data, split)):
                raise Fail(f"--data {cfg.data}: no {split}/ folder (expected an ImageFolder root with train/ and val/)")
        try:
            train_set = datasets.ImageFolder(os.path.join(cfg.data, 'train'), transform=train_tf)
            val_set = datasets.ImageFolder(os.path.join(cfg.data, 'val'), transform=val_tf)
        except (FileNotFoundError, OSError) as e:
            raise Fail(f"--data {cfg.data}: {str(e).split('. Supported')[0]}")
        if train_set.classes != val_set.classes:
            raise Fail(f"--data {cfg.data}: train/ has {len(train_set.classes)} classes, val/ has "
                       f"{len(val_set.classes)}, and they must be the same folders")
    if cfg.train_subset and cfg.train_subset < len(train_set):
        subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:cfg.train_subset]
        train_set = torch.utils.data.Subset(train_set, subset.tolist())
    return train_set, val_set, len(val_set.classes)


class SeededSampler(torch.utils.data.Sampler):
    """timm's RepeatAugSampler, yielding (index, seed) pairs. The seed fixes each sample's augmentation by
    (run seed, epoch, global position), whatever the persistent workers did before: a resumed run augments
    exactly like an uninterrupted one, and `start` skips what an interrupted epoch already trained on.
    selected_round=0: timm's default rounds an epoch down to a multiple of 256 images, dropping up to 255 a
    rank (all of them on a dataset under 256); with 0 an epoch is exactly one dataset long."""

    def __init__(self, train_set, aug_repeats, world, rank, seed=0):
        self.sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, num_repeats=aug_repeats,
                                        selected_round=0)
        self.world, self.rank, self.seed, self.epoch, self.start = world, rank, seed, 0, 0

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.sampler) - self.start

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, hash((self.seed, self.epoch, position * self.world + self.rank)) & (2 ** 62 - 1)


class RobustDataset(torch.utils.data.Dataset):
    """Seeds the augmentation of each sample, and replaces an unreadable file (corrupt, truncated, not an
    image) by the next one, returning its name so the main process can report and count it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            random.seed(seed), np.random.seed(seed % 2 ** 32), torch.manual_seed(seed)
        bad = ''
        for i in range(index, index + len(self.dataset)):
            try:
                image, label = self.dataset[i % len(self.dataset)]
                return image, label, bad
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                samples = getattr(self.dataset, 'samples', None)
                bad = bad or f"{samples[i % len(self)][0] if samples else f'image #{i % len(self)}'} ({e})"
        raise RuntimeError(f"no readable file in the dataset: {bad}")


def worker_init(_):
    # torchrun and Slurm signal the whole process group: the trainer stops and checkpoints, its data workers
    # must live on until then (a failing trainer SIGKILLs them, see the end of this file)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def rng_state():
    np_state = np.random.get_state(legacy=False)
    return {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy_pos': np_state['state']['pos'],
            'numpy_key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
            'numpy_gauss': (np_state['has_gauss'], np_state['gauss']),
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    np.random.set_state(('MT19937', state['numpy_key'].numpy().astype(np.uint32), state['numpy_pos'],
                         *state['numpy_gauss']))
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# -----------------------------------------------------------------------------
# the pieces of one training step (bench.py and the tests use these too)

def make_mixup(cfg, num_classes):
    """Batch-wise mixup (alpha 0.8) or cutmix (alpha 1.0), one of the two per batch, no label smoothing:
    KD replaces label smoothing (Table 1). correct_lam makes cutmix's lambda the pasted box's true area."""
    if cfg.mixup == 0 and cfg.cutmix == 0:
        return lambda x, y: (x, torch.nn.functional.one_hot(y, num_classes).float())
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=0.5, mode='batch',
                 correct_lam=True, label_smoothing=0.0, num_classes=num_classes)


def make_optimizer(model, cfg, total_steps):
    """AdamW with no decay on biases and norm parameters; one-cycle lr stepped every iteration, peak LR.

    The lr is not scaled with the batch: the paper trains 512 to 3456 with the same 2e-3. OneCycleLR also
    cycles Adam's beta1 (0.85-0.95), as in the authors' code, which uses torch's defaults.
    """
    params = param_groups_weight_decay(model, cfg.weight_decay)
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=cfg.pct_start)
    return optimizer, scheduler


def train_step(model, teacher, images, labels, mixup_fn, optimizer, scheduler, cfg, autocast):
    """One USI step: mix, teacher and student forward, CE + alpha_kd * KD, backward, AdamW, lr step.
    Returns the detached (ce, kd) losses; reading them syncs the device, so the loop does it rarely."""
    images, mixed_target = mixup_fn(images, labels)
    # The teacher sees exactly the student's mixed batch: its soft labels then describe the image the
    # student is actually shown, including the mixed-in one, instead of a mixup of two clean predictions.
    teacher_logits = teacher(images) if teacher is not None else None
    with autocast:
        student_logits = model(images)
    ce = SoftTargetCrossEntropy()(student_logits.float(), mixed_target)
    kd = kd_loss(student_logits, teacher_logits, cfg.kd_tau) if teacher is not None else torch.zeros_like(ce)
    loss = kd if math.isinf(cfg.alpha_kd) else ce + cfg.alpha_kd * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return ce.detach(), kd.detach()


@torch.no_grad()
def evaluate(model, loader, device, autocast, ddp):
    """(top-1, top-5) in percent over the whole loader, summed over ranks (each holds its own shard)."""
    model.eval()
    stats = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    for images, labels, _ in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        stats += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    if ddp:
        dist.all_reduce(stats)
    return (100 * stats[0] / stats[2]).item(), (100 * stats[1] / stats[2]).item()


def save_checkpoint(state, path):
    """Write a temp file, flush it to disk, then rename: a kill or a full disk mid-write never leaves a
    truncated checkpoint at `path`, and the previous one stays loadable."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise Fail(f"could not write {path} ({e}); the previous checkpoint there is kept")


# -----------------------------------------------------------------------------

def main(argv):
    cfg = get_config(argv)
    # setup: DDP from torchrun's environment, else one process
    ddp = 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', 1)) > 1
    on_cuda = torch.cuda.is_available()
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        if on_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if on_cuda else 'gloo')
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = torch.device(f'cuda:{local_rank}' if on_cuda else 'cpu')
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    use_compile = cfg.compile and on_cuda  # on CPU compile costs minutes of C++ builds for little gain
    log(f"config: {json.dumps(vars(cfg))}\nprocesses: {world}, device: {device}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    # Slurm and Kubernetes send SIGTERM or SIGUSR1 before preemption: stop at a step boundary, checkpoint, exit 0
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
    last_path, best_path, log_path = (os.path.join(cfg.out_dir, f) for f in ('last.pt', 'best.pt', 'log.jsonl'))
    ckpt = None
    if cfg.resume and not os.path.exists(last_path):
        log(f"resume: no {last_path} yet, starting fresh")  # so a requeue script can always pass --resume
    elif cfg.resume:
        try:
            ckpt = torch.load(last_path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise Fail(f"cannot read {last_path}: {str(e).splitlines()[0]}")
        changed = [f"--{k} {v} -> {getattr(cfg, k)}" for k, v in ckpt['config'].items()
                   if k not in FREE_KEYS and v != getattr(cfg, k) and (k, getattr(cfg, k)) != ('batch_size', 'auto')]
        if changed:  # a different model or schedule is a different run, not a continuation
            raise Fail(f"{last_path} was trained with another recipe ({', '.join(changed)}); "
                       f"resume with the same flags or use another --out_dir")
        cfg.batch_size = ckpt['config']['batch_size']  # 'auto' resumes with the batch it found

    # data and model: the student's images are normalized the way its own timm config says
    if not timm.is_model(cfg.model):
        raise Fail(f"unknown model '{cfg.model}' (not in timm.list_models())")
    mean, std = student_normalization(cfg.model)
    train_set, val_set, num_classes = make_datasets(cfg, mean, std)
    if ckpt is not None and (ckpt['num_classes'] != num_classes or ckpt['train_images'] != len(train_set)):
        raise Fail(f"{last_path} is for another dataset ({ckpt['num_classes']} classes, {ckpt['train_images']} "
                   f"training images; --data has {num_classes} and {len(train_set)})")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = timm.create_model(cfg.model, num_classes=num_classes).to(device, memory_format=memory_format)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=3 / 4)
    log(f"model: {cfg.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # teacher: loaded, prepared, and checked on the validation set before a single step is spent
    teacher = None
    if cfg.teacher != 'none':
        try:
            teacher = load_teacher(cfg.teacher, cfg.teacher_checkpoint or None, num_classes)
            teacher = prepare_teacher(teacher, mean, std, device, compile=use_compile)
        except ValueError as e:
            raise Fail(str(e))

    # batch and loaders
    if cfg.batch_size == 'auto':
        if not on_cuda:
            raise Fail("--batch_size auto searches for the largest batch that fits in GPU memory; it needs CUDA")
        from bench import find_max_batch, fits_in_memory  # bench.py owns the search, so the two agree
        largest = torch.tensor(find_max_batch(lambda b: fits_in_memory(model, teacher, b, cfg, num_classes, device)),
                               device=device)
        if ddp:
            dist.all_reduce(largest, op=dist.ReduceOp.MIN)  # every process must use the same batch
        cfg.batch_size = int(0.85 * largest.item()) // 8 * 8 * world
        log(f"batch: largest that fits {largest.item()} per process, using 0.85 of it: {cfg.batch_size} in all")
    if cfg.batch_size % world:
        raise Fail(f"--batch_size {cfg.batch_size} is not divisible by the {world} processes")
    batch = cfg.batch_size // world
    if batch % 2 and (cfg.mixup or cfg.cutmix):
        raise Fail(f"per-process batch {batch} is odd; mixup/cutmix pair images, so it must be even")
    train_sampler = SeededSampler(train_set, cfg.aug_repeats, world, rank, cfg.seed)
    # a worker that hangs (dead NFS, a stuck file) raises after loader_timeout instead of a silent stall
    loader_args = dict(num_workers=cfg.workers, pin_memory=on_cuda, persistent_workers=cfg.workers > 0,
                       timeout=cfg.loader_timeout if cfg.workers else 0, worker_init_fn=worker_init,
                       generator=torch.Generator().manual_seed(cfg.seed + rank))  # leaves the global RNG alone
    train_loader = torch.utils.data.DataLoader(RobustDataset(train_set), batch_size=batch, sampler=train_sampler,
                                               drop_last=True, **loader_args)
    # validation shards are disjoint and uneven (no padding, no duplicates): evaluate() sums the counts
    val_shard = torch.utils.data.Subset(RobustDataset(val_set), range(rank, len(val_set), world))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=batch, **loader_args)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise Fail(f"{len(train_sampler)} training images per process are fewer than the batch of {batch}")
    total_steps = cfg.epochs * steps_per_epoch
    log(f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
        f"{steps_per_epoch} steps of {batch} x {world} per epoch")

    if teacher is not None:
        teacher_top1, teacher_top5 = evaluate(teacher, val_loader, device, contextlib.nullcontext(), ddp)
        log(f"teacher: {cfg.teacher}, val top-1 {teacher_top1:.2f}%, top-5 {teacher_top5:.2f}%")
        if teacher_top1 < chance_threshold(num_classes):
            raise Fail(f"teacher {cfg.teacher} scores {teacher_top1:.2f}% top-1 on this validation set, near "
                       f"chance ({100 / num_classes:.2f}%): its weights did not load or fit this dataset")

    optimizer, scheduler = make_optimizer(model, cfg, total_steps)

    # resume: weights, EMA, optimizer moments, lr-schedule step, sampler position and RNG states
    start_epoch, step, epoch_step, best, bad_files = 0, 0, 0, {'top1': -1.0, 'epoch': 0}, set()
    loss_sum, images_seen = torch.zeros(2, device=device), 0
    if ckpt is not None:
        if ckpt['total_steps'] != total_steps or (ckpt['epoch_step'] and ckpt['world_size'] != world):
            raise Fail(f"{last_path} was written by {ckpt['world_size']} processes ({ckpt['total_steps']} steps in "
                       f"all, {ckpt['epoch_step']} into epoch {ckpt['epoch'] + 1}); on {world} the schedule or the "
                       f"epoch's order of samples would change: resume on {ckpt['world_size']} processes")
        model.load_state_dict(ckpt['model'])
        ema.module.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        start_epoch, step, epoch_step, best = ckpt['epoch'], ckpt['step'], ckpt['epoch_step'], ckpt['best']
        loss_sum, images_seen, bad_files = ckpt['loss_sum'].to(device), ckpt['images_seen'], set(ckpt['bad_files'])
        if master and os.path.exists(log_path):  # drop epochs logged after last.pt was written
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)['epoch'] <= start_epoch]
            with open(log_path, 'w') as f:
                f.writelines(kept)
        log(f"resume: {last_path} at epoch {start_epoch}, step {step}" +
            (f" ({epoch_step} steps into epoch {start_epoch + 1})" if epoch_step else ""))

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[local_rank] if on_cuda else None)
    mixup_fn = make_mixup(cfg, num_classes)
    # different augmentations and mixing per rank (timm's Mixup draws from numpy); a resumed run goes on
    # with the RNG states it saved, so it trains bit for bit like an uninterrupted one
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if ckpt is not None and len(ckpt['rng']) == world:
        set_rng_state(ckpt['rng'][rank])

    def checkpoint(epoch, path, raw_better=True):
        """last.pt or best.pt (rank 0 writes; every rank gives its RNG state). Never NaN weights."""
        if not all(p.isfinite().all() for p in raw_model.parameters()):
            raise Fail(f"non-finite weights at step {step}: not written; {last_path} from before is kept")
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state()) if ddp else rngs.__setitem__(0, rng_state())
        if master:
            raw_state, ema_state = raw_model.state_dict(), ema.module.state_dict()
            save_checkpoint({
                'model': raw_state, 'ema': ema_state, 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'epoch': epoch, 'step': step, 'epoch_step': epoch_step,
                'total_steps': total_steps, 'world_size': world, 'best': best, 'config': vars(cfg), 'rng': rngs,
                'num_classes': num_classes, 'train_images': len(train_set), 'loss_sum': loss_sum.cpu(),
                'images_seen': images_seen, 'bad_files': sorted(bad_files),
                # what timm.create_model(..., checkpoint_path=) loads: the better of raw and EMA
                'state_dict': raw_state if raw_better else ema_state}, path)

    # training loop
    t_start, t_ckpt, first_step = time.time(), time.time(), step
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_sampler.set_epoch(epoch, start=epoch_step * batch)
        t_epoch, t_log, step_log = time.time(), time.time(), step
        nonfinite_step = torch.zeros((), device=device, dtype=torch.long)  # first step with a NaN/inf loss
        batches = iter(train_loader)
        while epoch_step < steps_per_epoch:
            try:
                images, labels, bad = next(batches)
            except RuntimeError as e:  # a worker died or hung; after a stop signal, workers may be gone too
                if not stop_signal:
                    raise Fail(f"data loading failed at step {step}: {str(e).splitlines()[0]}")
                images = None
            if images is not None:
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                ce, kd = train_step(model, teacher, images, labels, mixup_fn, optimizer, scheduler, cfg, autocast)
                step, epoch_step = step + 1, epoch_step + 1
                ema.update(raw_model, step=step)
                nonfinite_step = torch.where((nonfinite_step == 0) & ~(ce + kd).isfinite(), step, nonfinite_step)
                loss_sum += torch.stack([ce, kd])
                images_seen += len(images) * world
                for name in filter(None, bad):
                    if name not in bad_files:
                        print(f"rank {rank}: unreadable file replaced by the next one: {name}")
                    bad_files.add(name)
                if len(bad_files) > cfg.max_bad_files * len(train_set):
                    raise Fail(f"{len(bad_files)} unreadable training files (over {cfg.max_bad_files:.0%} of "
                               f"{len(train_set)}): the dataset is broken, e.g. {sorted(bad_files)[0]}")
                if step % cfg.log_every == 0 and master:
                    speed = (step - step_log) * batch * world / (time.time() - t_log)
                    eta = (time.time() - t_start) / max(1, step - first_step) * (total_steps - step)
                    log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} ce {ce.item():.4f} "
                        f"kd {kd.item():.4f} lr {scheduler.get_last_lr()[0]:.2e} {speed:.0f} img/s "
                        f"eta {eta / 60:.1f} min")
                    t_log, step_log = time.time(), step
            # the ranks agree every CHECK_EVERY steps: one small all-reduce, not a device sync per step
            if images is None or step % cfg.check_every == 0 or epoch_step == steps_per_epoch:
                due = time.time() - t_ckpt > cfg.ckpt_minutes * 60
                control = torch.stack([torch.tensor(float(bool(stop_signal)), device=device),
                                       torch.tensor(float(due), device=device), nonfinite_step.double()])
                if ddp:
                    dist.all_reduce(control, op=dist.ReduceOp.MAX)
                if control[2] > 0:
                    raise Fail(f"non-finite loss at step {int(control[2])}: the run diverged; {last_path} "
                               f"from before is kept (lower --lr, or check the data)")
                if control[0] or (control[1] and epoch_step < steps_per_epoch):
                    checkpoint(epoch, last_path)
                    t_ckpt = time.time()
                if control[0]:
                    log(f"stopped by a signal at step {step}: {last_path} written; --resume goes on from there")
                    if ddp:
                        dist.destroy_process_group()
                    return
        epoch_step = 0
        ce_mean, kd_mean = (loss_sum / steps_per_epoch).tolist()
        train_loss = kd_mean if math.isinf(cfg.alpha_kd) else ce_mean + cfg.alpha_kd * kd_mean
        record = {'epoch': epoch + 1, 'step': step, 'train_loss': train_loss, 'train_ce': ce_mean,
                  'train_kd': kd_mean, 'lr': scheduler.get_last_lr()[0],
                  'img_per_sec': images_seen / (time.time() - t_epoch),
                  'bad_files': len(bad_files), 'val_top1': None, 'val_top5': None, 'ema_top1': None, 'ema_top5': None}
        loss_sum, images_seen = torch.zeros(2, device=device), 0

        # validate raw and EMA weights; the better of the two is what counts and what best.pt keeps
        raw_better = True
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            # not through DDP: its per-forward buffer broadcast would hang on the uneven validation shards
            top1, top5 = evaluate(model.module if ddp else model, val_loader, device, autocast, ddp)
            ema_top1, ema_top5 = evaluate(ema.module, val_loader, device, autocast, ddp)
            raw_better = top1 >= ema_top1
            record.update(val_top1=top1, val_top5=top5, ema_top1=ema_top1, ema_top5=ema_top5)
            if max(top1, ema_top1) > best['top1']:
                best = {'top1': max(top1, ema_top1), 'epoch': epoch + 1, 'weights': 'raw' if raw_better else 'ema'}
        record['elapsed_s'] = time.time() - t_start
        log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                               if v is not None and k != 'epoch'))
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        checkpoint(epoch + 1, last_path, raw_better)
        t_ckpt = time.time()
        if best['epoch'] == epoch + 1:
            checkpoint(epoch + 1, best_path, raw_better)

    if ddp:  # DDP keeps replicas bitwise equal; check it, since a silent desync would waste the run
        sums = torch.stack([sum(p.double().sum() for p in raw_model.parameters()),
                            sum(p.double().square().sum() for p in raw_model.parameters())]).to(device)
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
        log(f"weights identical across {world} ranks: {in_sync}")
        dist.destroy_process_group()
        if not in_sync:
            raise Fail("the ranks' weights differ at the end of training")
    log(f"best val top-1 {best['top1']:.2f}% (epoch {best['epoch']})")

if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (Fail, RuntimeError) as e:  # torch's SIGCHLD handler raises RuntimeError anywhere when a worker dies
        if not isinstance(e, Fail) and 'DataLoader worker' not in str(e):
            raise
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills below
        for worker in multiprocessing.active_children():  # they ignore SIGTERM; a hung one would block exit
            worker.kill()
        sys.exit(f"train.py: error: {e}" if isinstance(e, Fail) else
                 f"train.py: error: data loading failed: {str(e).splitlines()[0].strip()}")
