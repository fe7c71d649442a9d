"""USI: "Solving ImageNet: a Unified Scheme for Training any Backbone to Top Results" (Ridnik et al., 2022).
One fixed recipe plus vanilla knowledge distillation from a strong teacher, for any timm backbone.

    python train.py --model resnet18 --data fashion-mnist --teacher none --img_size 32     # one process
    torchrun --nproc_per_node=8 train.py --model resnet50 --data /path/to/imagenet         # 8 GPUs, DDP
Every hyperparameter below equals the paper's Table 1 (or the authors' code where it is silent) and can be
overridden: --batch_size 256. What keeps a long run alive on a cluster is in resilience.py.
"""
import argparse
import ast
import copy
import functools
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets, transforms

import resilience
from device_data import Augment, Draw, collate, device_batches, read_file
from distill import (chance_threshold, check_input_size, create_model, first_line, kd_loss, load_teacher,
                     load_weights, prepare_teacher, read_checkpoint)
from resilience import (CHECK_EVERY, CKPT_MINUTES, DIST_TIMEOUT, LOADER_TIMEOUT, MAX_BAD_FILES, Fail, RobustDataset,
                        SeededSampler, Watchdog, check_replicas_in_sync, checkpoint, batch_sizes, init_process_group,
                        one_line_errors, resume, worker_init)

# ---------------------------------------------------------------------------------------------- model and data
MODEL = 'resnet50'                # student backbone, any timm name (paper: "any backbone")
MODEL_KWARGS = {}                 # timm.create_model arguments, key=value ... (timm's --model-kwargs): patch_size=4
DATA = ''                         # ImageFolder root with train/ and val/, or 'fashion-mnist' / 'cifar10'
DATA_DIR = './data'               # where torchvision datasets are downloaded / found
TRAIN_SUBSET = 0                  # train on a fixed random subset of this many images (0: all); for CPU runs
IMG_SIZE = 224                    # train and test resolution (Table 1: 224 / 224)
TEST_CROP_RATIO = 0.95            # eval: resize short side to round(224 / 0.95), center-crop 224 (Table 1)
DATA_PIPELINE = 'workers'         # PIL in the workers; 'device': device_data.py (default on CUDA once GPU-tested)
# teacher and KD
TEACHER = 'tresnet_v2_l'          # TResNet-L, 83.9% top-1 (Table 1); 'none' trains without KD
TEACHER_CHECKPOINT = ''           # local teacher weights (timm checkpoint or train.py's best.pt); '' = hub
PRETRAINED = False                # start the student from timm's pretrained weights (your own dataset)
INIT_CHECKPOINT = ''              # start the student from a local checkpoint; a new head where classes differ
EVAL_CHECKPOINT = ''              # only evaluate this checkpoint on val/ (top-1, top-5 of raw and EMA), no training
ALPHA_KD = 5.0                    # KD weight (Table 1, ablated in Table 6); 'inf' = teacher only, no CE
KD_TAU = 1.0                      # KD temperature (Table 1, ablated in Table 7)
# optimization
EPOCHS = 300                      # training epochs (Table 1)
BATCH_SIZE = 1024                 # global batch, split over processes (Table 1: 512 to 3456); 'auto' on CUDA
MAX_BATCH = 3456                  # global cap of --batch_size auto: Table 3's largest at lr 2e-3
ACCUM_STEPS = 1                   # micro-batches per AdamW step: the paper's batch on fewer GPUs; 'auto' on CUDA
LR = 2e-3                         # peak one-cycle lr, not scaled with the batch (Table 1)
WEIGHT_DECAY = 2e-2               # AdamW decoupled decay (Table 1), on weights only, not biases or norms
PCT_START = 0.2                   # share of the one-cycle spent rising (authors' public code)
EMA_DECAY = 0.99996               # per-step EMA of the weights (authors' public code), with a warmup
# augmentation
RAND_AUGMENT = 'rand-m7-mstd0.5-inc1'  # RandAugment m7, mstd 0.5 (Table 1; 'inc1' from the authors' code)
MIXUP = 0.8                       # mixup alpha (Table 1)
CUTMIX = 1.0                      # cutmix alpha (Table 1); one of the two per batch, probability 0.5 each
AUG_REPEATS = 3                   # repeated augmentation (Table 1): each chosen image 3x per epoch
# system (and resilience.py's CKPT_MINUTES, CHECK_EVERY, LOADER_TIMEOUT, MAX_BAD_FILES, DIST_TIMEOUT: long runs)
# data-loading processes per training process: its share of the cores, less one for the training loop
WORKERS = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1)
COMPILE = True                    # torch.compile the student and teacher (CUDA only)
EVAL_EVERY = 1                    # validate every N epochs (and always after the last)
LOG_EVERY = 50                    # print a line every N steps
OUT_DIR = 'out'                   # where log.jsonl, last.pt and best.pt are written
RESUME = False                    # continue from OUT_DIR/last.pt
SEED = 0                          # base seed; rank r uses SEED + r
CONFIG_KEYS = [k for k, v in list(globals().items()) if k.isupper() and isinstance(v, (bool, int, float, str, dict))]
# must be > 0 (>= 0 for the rest): a bad value is stopped here, not 300 epochs later
POSITIVE = {'EPOCHS', 'BATCH_SIZE', 'MAX_BATCH', 'ACCUM_STEPS', 'IMG_SIZE', 'LR', 'KD_TAU', 'EVAL_EVERY', 'LOG_EVERY',
            'AUG_REPEATS', 'TEST_CROP_RATIO', 'CHECK_EVERY', 'DIST_TIMEOUT'}



# ------------------------------------------------------------------------------------------------------ config

def parse_bool(text):
    """--resume 1, --compile false: the spellings a boolean flag takes."""
    if text.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got '{text}'")
    return text.lower() in ('1', 'true', 'yes')


def int_or_auto(text):
    """A count, or 'auto' (argparse's error names it: "invalid int_or_auto value")."""
    if text == 'auto':
        return text
    return int(text)


def model_kwarg(text):
    """One --model_kwargs item, key=value, its value read as a Python literal where it is one (timm's ParseKwargs)."""
    key, equals, value = text.partition('=')
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def flag_help():
    """{section: {KEY: meaning}} from the comments at the top of this file and resilience.py: a constant's comment
    is its flag's --help, so that the two cannot drift apart. A full-line comment above a constant starts a section
    ('# optimization'); a constant whose line has no room for its comment has it on the line above."""
    sections = {}
    for path in (__file__, resilience.__file__):
        comments = []
        for line in open(path):
            if line.startswith('#'):
                comments.append(line.strip('#- \n'))
                continue
            constant = re.match(r'([A-Z][A-Z0-9_]*) = .*?(?:  # (.*))?$', line)
            if constant and constant[1] in CONFIG_KEYS:
                meaning = constant[2] or comments.pop()
                if comments:
                    title = comments[0].split(' (')[0].split(':')[0]
                    sections[title] = {}
                sections[title][constant[1]] = meaning
            comments = []
    return sections


def add_flag(group, key, meaning):
    """The flag of one constant, --name; timm's spelling --name-with-dashes parses too, left out of --help."""
    default = globals()[key]
    name = key.lower()
    options = {'dest': name, 'default': default, 'help': f"{meaning} (default: {default!r})".replace('%', '%%')}
    if isinstance(default, bool):
        # A bare --resume, or --resume=1, --compile 0.
        options.update(type=parse_bool, nargs='?', const=True, metavar='0|1')
    elif isinstance(default, dict):
        # --model_kwargs patch_size=4 depth=6
        options.update(type=model_kwarg, nargs='*', default=[], metavar='KEY=VALUE')
    elif key in ('BATCH_SIZE', 'ACCUM_STEPS'):
        # 'auto': 0.85 of the largest batch that fits, as the paper advises (Section 2.3).
        options.update(type=int_or_auto, metavar='N')
    elif key == 'DATA_PIPELINE':
        options.update(choices=('workers', 'device'))
    else:
        options.update(type=type(default), metavar=type(default).__name__.upper())
    group.add_argument(f'--{name}', **options)
    if '_' in name:
        group.add_argument(f"--{name.replace('_', '-')}", **options | {'help': argparse.SUPPRESS})


def exit_with(message):
    """argparse's errors as one line, instead of its usage and the error."""
    sys.exit(Fail(message).code)


def get_config(argv):
    """The constants above, overridden by argv; returns a namespace with lowercase names."""
    # One line a flag where the terminal allows: its meaning and source, then its default.
    formatter = functools.partial(argparse.RawDescriptionHelpFormatter, max_help_position=30, width=120)
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=formatter,
                                     usage='%(prog)s --data DIR [--model NAME] [--teacher NAME] [flags below]')
    parser.error = exit_with
    for title, meanings in flag_help().items():
        group = parser.add_argument_group(title)
        for key, meaning in meanings.items():
            add_flag(group, key, meaning)
    cfg = parser.parse_args(argv)
    cfg.model_kwargs = dict(cfg.model_kwargs)
    # A bad value is stopped here, not 300 epochs later.
    for key in CONFIG_KEYS:
        value = getattr(cfg, key.lower())
        if type(value) not in (int, float):
            continue
        if key in POSITIVE and not value > 0:
            parser.error(f"--{key.lower()} must be > 0, got {value}")
        if not value >= 0:
            parser.error(f"--{key.lower()} must be >= 0, got {value}")
    if not cfg.data:
        parser.error("--data is required: an ImageFolder root with train/ and val/, fashion-mnist or cifar10")
    if cfg.teacher.lower() == 'none':
        if math.isinf(cfg.alpha_kd):
            parser.error("--alpha_kd inf trains on the teacher alone; it needs a --teacher")
        # Spelled one way, so that --resume compares like with like.
        cfg.teacher = 'none'
        cfg.alpha_kd = 0.0
    return cfg


def check_models(cfg):
    """A size or a model argument the student or the teacher cannot take is one line, before anything is loaded
    or written."""
    if not timm.is_model(cfg.model):
        raise Fail(f"unknown model '{cfg.model}' (not in timm.list_models())")
    try:
        check_input_size(cfg.model, cfg.img_size, **cfg.model_kwargs)
        # A teacher from one of train.py's checkpoints takes its model arguments from it: checked as it loads.
        teacher_by_name = cfg.teacher != 'none' and not cfg.teacher_checkpoint and not cfg.eval_checkpoint
        if teacher_by_name and timm.is_model(cfg.teacher):
            check_input_size(cfg.teacher, cfg.img_size)
    except ValueError as e:
        raise Fail(str(e))


# ---------------------------------------------------------------------------------------------------------- data

def make_transforms(cfg, mean, std):
    """USI's training transform (timm's: crop 0.08-1, flip, RandAugment, bicubic) and the 0.95-crop evaluation,
    both ending in uint8 tensors: device_batches normalizes them on the device."""
    train_transform = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.rand_augment,
                                       use_prefetcher=True, interpolation='bicubic', scale=(0.08, 1.0), hflip=0.5,
                                       mean=mean, std=std)
    val_transform = transforms.Compose([
        transforms.Resize(round(cfg.img_size / cfg.test_crop_ratio), transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.img_size),
        transforms.PILToTensor()])
    if cfg.data_pipeline == 'device':
        # The workers read the bytes and draw the same augmentation; device_data applies it to whole batches.
        return Draw(train_transform), Draw()
    return train_transform, val_transform


def to_rgb(image):
    """Fashion-MNIST is grey: timm's transforms and models take three channels."""
    return image.convert('RGB')


def torchvision_datasets(cfg, train_transform, val_transform):
    """--data fashion-mnist or cifar10, found in (or downloaded to) --data_dir."""
    builder = datasets.CIFAR10
    if cfg.data == 'fashion-mnist':
        builder = datasets.FashionMNIST
    try:
        train_set = builder(cfg.data_dir, train=True, transform=transforms.Compose([to_rgb, train_transform]),
                            download=True)
        val_set = builder(cfg.data_dir, train=False, transform=transforms.Compose([to_rgb, val_transform]),
                          download=True)
    except Exception as e:
        raise Fail(f"could not find or download {cfg.data} into {cfg.data_dir} ({first_line(e)}); "
                   f"python quickstart.py finds or fetches Fashion-MNIST, also offline")
    return train_set, val_set


def image_folders(cfg, train_transform, val_transform):
    """--data DIR: ImageFolders DIR/train and DIR/val, with the same class folders (DIR/val alone to evaluate)."""
    loader = datasets.folder.default_loader
    if cfg.data_pipeline == 'device':
        loader = read_file
    splits = {'train': train_transform, 'val': val_transform}
    if cfg.eval_checkpoint:
        splits = {'val': val_transform}
    for split in splits:
        if not os.path.isdir(os.path.join(cfg.data, split)):
            raise Fail(f"--data {cfg.data}: no {split}/ folder (expected an ImageFolder root with train/ and val/)")
    folders = {}
    try:
        for split, transform in splits.items():
            folders[split] = datasets.ImageFolder(os.path.join(cfg.data, split), transform=transform, loader=loader)
    except (FileNotFoundError, OSError) as e:
        # ImageNet's val/ ships flat: images, no class folders.
        flat = ''
        if 'class folder' in str(e):
            flat = "; sort val/ into class folders (README, 'ImageNet')"
        raise Fail(f"--data {cfg.data}: {str(e).split('. Supported')[0]}{flat}")
    train_set = folders.get('train')
    val_set = folders['val']
    if train_set and train_set.classes != val_set.classes:
        raise Fail(f"--data {cfg.data}: train/ has {len(train_set.classes)} classes, val/ has "
                   f"{len(val_set.classes)}, and they must be the same folders")
    return train_set, val_set


def make_datasets(cfg, mean, std):
    """(train_set, val_set, num_classes): uint8 images, augmented for training as USI does (see make_transforms);
    train_set is None where only val/ is evaluated."""
    train_transform, val_transform = make_transforms(cfg, mean, std)
    if cfg.data in ('fashion-mnist', 'cifar10'):
        train_set, val_set = torchvision_datasets(cfg, train_transform, val_transform)
    else:
        train_set, val_set = image_folders(cfg, train_transform, val_transform)
    if train_set and cfg.train_subset and cfg.train_subset < len(train_set):
        # The same subset for every run and seed: the generator's seed is 0, not --seed.
        subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:cfg.train_subset]
        train_set = torch.utils.data.Subset(train_set, subset.tolist())
    return train_set, val_set, len(val_set.classes)


def make_loader(dataset, batch, cfg, rank, sampler=None):
    """Persistent workers; a hung one raises after --loader_timeout; a generator that leaves the global RNG be."""
    collate_fn = None
    if cfg.data_pipeline == 'device':
        collate_fn = collate
    timeout = 0
    if cfg.workers:
        timeout = cfg.loader_timeout
    return torch.utils.data.DataLoader(
        RobustDataset(dataset), batch_size=batch, sampler=sampler, drop_last=sampler is not None,
        num_workers=cfg.workers, pin_memory=torch.cuda.is_available(), persistent_workers=cfg.workers > 0,
        timeout=timeout, worker_init_fn=worker_init, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed + rank))


# ------------------------------- the USI step, AdamW + one-cycle, evaluation (bench.py and the tests use these too)

def one_hot_targets(num_classes):
    """Without mixup and cutmix, the targets are the labels one-hot, as Mixup would make them."""
    def unmixed(images, labels):
        return images, torch.nn.functional.one_hot(labels, num_classes).float()
    return unmixed


def make_mixup(cfg, num_classes):
    """Batch-wise mixup (alpha 0.8) or cutmix (alpha 1.0), one of the two per batch, no label smoothing:
    KD replaces label smoothing (Table 1). correct_lam makes cutmix's lambda the pasted box's true area."""
    if cfg.mixup == 0 and cfg.cutmix == 0:
        return one_hot_targets(num_classes)
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=0.5, mode='batch',
                 correct_lam=True, label_smoothing=0.0, num_classes=num_classes)


def train_step(model, teacher, images, labels, mixup_fn, optimizer, scheduler, cfg, autocast, accum_steps=1):
    """One USI step: mix, teacher and student forward, CE + alpha_kd * KD, backward, AdamW, lr step, over
    `accum_steps` micro-batches (BatchNorm sees those). Returns the mean (ce, kd); reading them syncs the device."""
    optimizer.zero_grad(set_to_none=True)
    losses = torch.zeros(2, device=images.device)
    micro_batches = zip(images.chunk(accum_steps), labels.chunk(accum_steps))
    for micro_step, (images, labels) in enumerate(micro_batches):
        # Mixup pairs images within the micro-batch.
        images, mixed_target = mixup_fn(images, labels)
        # The teacher sees exactly the student's mixed batch: its soft labels then describe the image the
        # student is actually shown, including the mixed-in one, instead of a mixup of two clean predictions.
        teacher_logits = None
        if teacher is not None:
            teacher_logits = teacher(images)
        # DDP all-reduces the gradients once, at the last micro-batch (as nanoGPT does).
        model.require_backward_grad_sync = micro_step == accum_steps - 1
        with autocast:
            student_logits = model(images)
        ce = SoftTargetCrossEntropy()(student_logits.float(), mixed_target)
        kd = torch.zeros_like(ce)
        if teacher is not None:
            kd = kd_loss(student_logits, teacher_logits, cfg.kd_tau)
        if math.isinf(cfg.alpha_kd):
            # --alpha_kd inf: the teacher's soft labels alone.
            loss = kd
        else:
            loss = ce + cfg.alpha_kd * kd
        (loss / accum_steps).backward()
        losses += torch.stack([ce, kd]).detach() / accum_steps
    optimizer.step()
    scheduler.step()
    return losses[0], losses[1]


def make_optimizer(model, cfg, total_steps):
    """AdamW without decay on biases, norms and the model's no_weight_decay() (a ViT's pos_embed, cls_token), as
    timm's create_optimizer_v2 and the authors' code; one-cycle lr per step, not scaled with the batch (the paper
    trains 512 to 3456 at 2e-3), cycling Adam's beta1 too (0.95-0.85), as the authors' code does."""
    skip = ()
    if hasattr(model, 'no_weight_decay'):
        skip = model.no_weight_decay()
    param_groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    pct_start = cfg.pct_start
    if pct_start * total_steps == 1:
        # OneCycleLR divides by the warmup's steps less one: a warmup of 1 step gets a second one.
        pct_start = 2 / total_steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=pct_start)
    return optimizer, scheduler


def make_ema(model, cfg, total_steps):
    """The authors' EMA with timm's warmup (power 3/4), its clock sped up total_steps / 25,000 times (1 / (1 - decay))
    on longer runs: 300 ImageNet epochs reach 0.99996 at 7% of the run, not after 731,000 steps; short runs as timm."""
    warmup_gamma = min(1.0, 1 / ((1 - cfg.ema_decay) * total_steps))
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=3 / 4, warmup_gamma=warmup_gamma)


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """(top-1, top-5 in percent, images) over all batches, summed over ranks (each holds its own shard)."""
    model.eval()
    # Top-1 hits, top-5 hits and images, counted on the device: no copy to the host per batch.
    stats = torch.zeros(3, device=device, dtype=torch.float64)
    for images, labels, _ in batches:
        with autocast:
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        stats += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), labels.new_full((), len(labels))])
    if dist.is_initialized():
        dist.all_reduce(stats)
    top1 = (100 * stats[0] / stats[2]).item()
    top5 = (100 * stats[1] / stats[2]).item()
    return top1, top5, int(stats[2])


def trial_steps(model, teacher, batch, cfg, num_classes, device, autocast):
    """Two train steps (the second holds AdamW's moments), uncompiled, on a copy: what --batch_size auto tries."""
    trial = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(trial, cfg, total_steps=2)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    mixup_fn = make_mixup(cfg, num_classes)
    for _ in range(2):
        # Mixup mixes in place: channels-last makes a fresh copy each time.
        fresh_images = images.contiguous(memory_format=torch.channels_last)
        train_step(trial, teacher, fresh_images, labels, mixup_fn, optimizer, scheduler, cfg, autocast)


# ------------------------------------------------------------------------------------------------- the run

def setup(cfg):
    """DDP from torchrun's environment, else one process. Returns (rank, world, device, log)."""
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device('cpu')
    if torch.cuda.is_available():
        device = torch.device(f'cuda:{local_rank}')
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1:
        backend = 'gloo'
        if device.type == 'cuda':
            backend = 'nccl'
        init_process_group(backend, rank, world, cfg.dist_timeout)
    log = print
    if rank != 0:
        log = print_nothing
    log(f"config: {json.dumps(vars(cfg))}\nprocesses: {world}, device: {device}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    return rank, world, device, log


def print_nothing(*args, **kwargs):
    """The log of ranks other than 0."""


def normalization(model_name):
    """(mean, std) of the model's own timm config: each student sees its images normalized as it expects."""
    data_cfg = timm.get_pretrained_cfg(model_name)
    if data_cfg is None:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return data_cfg.mean, data_cfg.std


def evaluate_checkpoint(cfg, val_set, num_classes, rank, world, device, mean, std, memory_format, log):
    """--eval_checkpoint: top-1 and top-5 on val/ of the raw and EMA weights of one of train.py's checkpoints
    (rebuilt with the model arguments it was trained with), or of the one set of weights of timm's."""
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda')
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    # timm's validate.py batch: there are no gradients to hold.
    val_loader = make_loader(val_shard, 256, cfg, rank)
    augment = None
    if cfg.data_pipeline == 'device':
        augment = Augment(cfg.img_size, False, mean, cfg.test_crop_ratio)
    try:
        ckpt = read_checkpoint(cfg.eval_checkpoint)
        trained = {}
        if isinstance(ckpt, dict):
            trained = ckpt.get('config', {})
        model_kwargs = cfg.model_kwargs or trained.get('model_kwargs', {})
        model = create_model(cfg.model, cfg.img_size, num_classes, **model_kwargs)
        model = model.to(device, memory_format=memory_format)
        weights = {'': ckpt}
        if 'ema' in ckpt:
            # Each set of weights keeps the run's config, so that load_weights knows the size it was made for.
            weights = {'raw': {'model': ckpt['model'], 'config': trained},
                       'EMA': {'model': ckpt['ema'], 'config': trained}}
        for name, state in weights.items():
            load_weights(model, state, source=cfg.eval_checkpoint)
            batches = device_batches(val_loader, device, mean, std, memory_format, augment)
            top1, top5, _ = evaluate(model, batches, device, autocast)
            log(f"{cfg.eval_checkpoint} {name}: val top-1 {top1:.2f}%, top-5 {top5:.2f}%")
    except ValueError as e:
        # A missing or unreadable file, another model or size: load_weights says which.
        raise Fail(f"--eval_checkpoint {cfg.eval_checkpoint}: {first_line(e)}")


def main(argv):
    cfg = get_config(argv)
    check_models(cfg)
    rank, world, device, log = setup(cfg)
    on_cuda = device.type == 'cuda'
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_cuda)
    memory_format = torch.contiguous_format
    if on_cuda:
        memory_format = torch.channels_last
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    best_path = os.path.join(cfg.out_dir, 'best.pt')
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')

    # Data: the student's images are normalized the way its own timm config says.
    mean, std = normalization(cfg.model)
    train_set, val_set, num_classes = make_datasets(cfg, mean, std)
    if cfg.eval_checkpoint:
        # Evaluate and exit: val/ alone, no training set, batch search or teacher.
        evaluate_checkpoint(cfg, val_set, num_classes, rank, world, device, mean, std, memory_format, log)
        return

    # The teacher, then the student. The teacher is compiled after the batch search, which runs shapes that
    # training never will.
    try:
        teacher = None
        if cfg.teacher != 'none':
            teacher = load_teacher(cfg.teacher, cfg.teacher_checkpoint or None, num_classes, cfg.img_size)
            teacher = prepare_teacher(teacher, mean, std, device)
        # Determinism: SEED fixes the initial weights (the same on every rank); SEED + rank each rank's RNGs
        # (mixup/cutmix, drop-path) and loader generators; (SEED, epoch, position) each sample's augmentation, the
        # epoch the order, 0 the --train_subset. A resumed run restores every RNG state from last.pt: bit for bit.
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, cfg.img_size, num_classes, cfg.pretrained, **cfg.model_kwargs)
        if cfg.init_checkpoint:
            model = load_weights(model, cfg.init_checkpoint, new_head=True)
    except Exception as e:
        # distill.py's one-line ValueErrors (a missing file, another model), a failed download.
        raise Fail(first_line(e))
    model = model.to(device, memory_format=memory_format)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # Batch and loaders: --batch_size is the global batch, split over the processes, each in `accum` micro-batches.
    trial = functools.partial(trial_steps, model, teacher, cfg=cfg, num_classes=num_classes, device=device,
                              autocast=autocast)
    global_batch, accum = batch_sizes(cfg, world, last_path, device, log, trial)
    batch = global_batch // world
    uneven = global_batch % world or batch % accum
    odd_pairs = batch // accum % 2 and (cfg.mixup or cfg.cutmix)
    if uneven or odd_pairs:
        raise Fail(f"--batch_size {global_batch} over {world} processes and {accum} micro-batches: each part must be "
                   f"whole, and even for mixup/cutmix, which pair images")
    train_sampler = SeededSampler(train_set, cfg.aug_repeats, world, rank, cfg.seed, accum, batch // accum)
    train_loader = make_loader(train_set, batch, cfg, rank, sampler=train_sampler)
    # Each rank evaluates its own shard, disjoint and uneven: evaluate sums them.
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = make_loader(val_shard, batch, cfg, rank)
    augment = {}
    if cfg.data_pipeline == 'device':
        augment['train'] = Augment(cfg.img_size, True, mean, cfg.test_crop_ratio)
        augment['val'] = Augment(cfg.img_size, False, mean, cfg.test_crop_ratio)
    val_batches = functools.partial(device_batches, val_loader, device, mean, std, memory_format, augment.get('val'))
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise Fail(f"{len(train_sampler)} training images per process are fewer than the batch of {batch}")
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"model: {cfg.model}, {parameters:.2f}M parameters; data: {len(train_set)} train / {len(val_set)} val "
        f"images, {num_classes} classes, {steps_per_epoch} steps/epoch")

    # Optimizer and EMA, and what a checkpoint holds: their states and what identifies the run.
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    ema = make_ema(model, cfg, total_steps)
    stateful = {'model': model, 'ema': ema.module, 'optimizer': optimizer, 'scheduler': scheduler}
    run = {'config': dict(vars(cfg), batch_size=global_batch), 'num_classes': num_classes, 'rank': rank,
           'train_images': len(train_set), 'total_steps': total_steps, 'world_size': world, 'accum_steps': accum}

    # Resume: resume() restores the states from last.pt (and refuses another run's); the loop's state follows.
    saved = resume(last_path if cfg.resume else None, run, stateful, log_path, log)
    start_epoch = saved['epoch']
    step = saved['step']
    epoch_step = saved['epoch_step']
    best_top1 = saved['best']['top1']
    best_epoch = saved['best']['epoch']
    best_raw_better = saved['best'].get('raw_better', True)
    loss_sum = saved['loss_sum'].to(device)
    bad_files = saved['bad_files']

    # The teacher is checked on the validation set before a single step is spent.
    teacher_top1 = math.inf
    if teacher is not None:
        teacher_top1, teacher_top5, _ = evaluate(teacher, val_batches(), device, autocast)
        log(f"teacher: {cfg.teacher}, val top-1 {teacher_top1:.2f}%, top-5 {teacher_top5:.2f}%, "
            f"{teacher.folded_bn} BatchNorms folded")
        if teacher_top1 < chance_threshold(num_classes):
            raise Fail(f"teacher {cfg.teacher} scores {teacher_top1:.2f}% top-1 on this validation set, near "
                       f"chance ({100 / num_classes:.2f}%): its weights did not load or fit this dataset")
    # Compiled with static shapes: the train batch, the validation batch and the last one compile in epoch 1.
    train_model = model
    if cfg.compile and on_cuda:
        train_model = torch.compile(model, dynamic=False)
        if teacher is not None:
            teacher = torch.compile(teacher, dynamic=False)
    # Evaluated without DDP, whose buffer broadcast would hang on the uneven validation shards.
    eval_model = train_model
    if world > 1:
        device_ids = None
        if on_cuda:
            device_ids = [device.index]
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    mixup = make_mixup(cfg, num_classes)
    watchdog = Watchdog(cfg, device, rank, len(train_set), bad_files, step)

    # The loop: fetch a batch, step, update the EMA, log, then stop or checkpoint where the watchdog says.
    # After each epoch: its record, evaluation of the raw and EMA weights, last.pt and best.pt.
    t_start = time.time()
    first_step = step
    for epoch in range(start_epoch, cfg.epochs):
        train_model.train()
        train_sampler.set_epoch(epoch, start=epoch_step * batch)
        t_epoch = time.time()
        t_log = t_epoch
        epoch_first_step = step
        log_first_step = step
        batches = device_batches(train_loader, device, mean, std, memory_format, augment.get('train'))
        for images, labels in watchdog.batches(batches):
            ce, kd = train_step(train_model, teacher, images, labels, mixup, optimizer, scheduler, cfg, autocast, accum)
            step += 1
            epoch_step += 1
            ema.update(model, step=step)
            loss_sum += torch.stack([ce, kd])
            if step % cfg.log_every == 0:
                speed = (step - log_first_step) * global_batch / (time.time() - t_log)
                eta = (time.time() - t_start) / max(1, step - first_step) * (total_steps - step)
                log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} ce {ce.item():.4f} kd {kd.item():.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {speed:.0f} img/s eta {eta / 60:.1f} min")
                t_log = time.time()
                log_first_step = step
            action = watchdog.check(step, ce + kd, epoch_end=epoch_step == steps_per_epoch)
            if action is not None:
                # A stop signal, or --ckpt_minutes since the last checkpoint: last.pt mid-epoch.
                best = {'top1': best_top1, 'epoch': best_epoch, 'raw_better': best_raw_better}
                progress = {'epoch': epoch, 'step': step, 'epoch_step': epoch_step, 'best': best,
                            'loss_sum': loss_sum.cpu(), 'bad_files': bad_files}
                checkpoint(last_path, stateful, run, progress)
            if action == 'stop':
                log(f"stopped by a signal at step {step}: last.pt written; --resume goes on from there")
                return

        # The epoch's record: its losses are the mean over ranks, as timm logs them (one all-reduce an epoch).
        if world > 1:
            dist.all_reduce(loss_sum)
        ce_mean, kd_mean = (loss_sum / (steps_per_epoch * world)).tolist()
        loss_sum.zero_()
        epoch_step = 0
        if math.isinf(cfg.alpha_kd):
            train_loss = kd_mean
        else:
            train_loss = ce_mean + cfg.alpha_kd * kd_mean
        pil_decodes = 0
        if augment:
            # JPEGs the device's decoder refused, decoded by PIL instead.
            pil_decodes = augment['train'].pil_decodes
        epoch_seconds = time.time() - t_epoch
        record = {'epoch': epoch + 1, 'step': step, 'train_ce': ce_mean, 'train_kd': kd_mean,
                  'train_loss': train_loss, 'lr': scheduler.get_last_lr()[0], 'bad_files': len(bad_files),
                  'pil_decodes': pil_decodes, 'img_per_sec': (step - epoch_first_step) * global_batch / epoch_seconds,
                  'data_wait': watchdog.waited / epoch_seconds, 'val_top1': None, 'val_top5': None,
                  'ema_top1': None, 'ema_top5': None, 'val_images': None}
        if record['data_wait'] > 0.2:
            log(f"warning: data-bound, {record['data_wait']:.0%} of the epoch waiting: raise --workers, use fast disks")

        # Validate the raw and the EMA weights: the better of the two is what counts, and what best.pt keeps.
        raw_better = True
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            top1, top5, val_images = evaluate(eval_model, val_batches(), device, autocast)
            ema_top1, ema_top5, _ = evaluate(ema.module, val_batches(), device, autocast)
            raw_better = top1 >= ema_top1
            record.update(val_top1=top1, val_top5=top5, ema_top1=ema_top1, ema_top5=ema_top5, val_images=val_images)
            if max(top1, ema_top1) > best_top1:
                best_top1 = max(top1, ema_top1)
                best_epoch = epoch + 1
                best_raw_better = raw_better
            if max(top1, ema_top1) > teacher_top1:
                log(f"the student now beats its teacher ({max(top1, ema_top1):.2f}% > {teacher_top1:.2f}%): USI needs "
                    f"a teacher that outperforms the student (Section 2.3): bench.py --teachers, or --teacher none")
                # Said once: it changes nothing in the training.
                teacher_top1 = math.inf
        record['elapsed_s'] = time.time() - t_start
        figures = [f"{key} {value:.4g}" for key, value in record.items() if key != 'epoch' and value is not None]
        log(f"epoch {epoch + 1}: " + ", ".join(figures))
        if rank == 0:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

        best = {'top1': best_top1, 'epoch': best_epoch, 'raw_better': best_raw_better}
        progress = {'epoch': epoch + 1, 'step': step, 'epoch_step': 0, 'best': best, 'loss_sum': torch.zeros(2),
                    'bad_files': bad_files}
        checkpoint(last_path, stateful, run, progress, raw_better)
        if best_epoch == epoch + 1:
            checkpoint(best_path, stateful, run, progress, raw_better)
    check_replicas_in_sync(model, log)
    log(f"best val top-1 {best_top1:.2f}% (epoch {best_epoch})")


if __name__ == '__main__':
    with one_line_errors():
        main(sys.argv[1:])
