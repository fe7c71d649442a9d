"""
What USI training costs on this machine, in the spirit of the paper's Table 10 (inference and training img/s,
largest batch) and Table 3 (the price of KD). Synthetic data, warm-up steps, then timed steps with the device
synchronized. The training step is train.py's own `train_step`, imported, not copied.

    python bench.py --model resnet50 --teacher tresnet_v2_l                 # GPU, 224 px
    python bench.py --model resnet18 --teacher resnet50 --img_size 64 --device cpu
    python bench.py --models resnet50,tresnet_m --batch_size auto --data /path/to/imagenet  # + both data paths
    python bench.py --model resnet50 --teachers menu --plot teachers.png    # which teacher: top-1 against its cost
    python bench.py --models table2 --img_size 64 --steps 3                 # the paper's Table 2 backbones
"""
import argparse
import copy
import functools
import gc
import itertools
import json
import sys
import time

import timm
import torch
# Synthetic data: any normalization will do, and timm's ImageNet one is at hand.
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD
from torch.utils._python_dispatch import TorchDispatchMode

import train
from distill import create_model, first_line, has_fast_bf16, prepare_teacher
from resilience import find_max_batch, fits_in_memory, usable_batch

# ----------------------------------------------------------------------------------------------- teachers and backbones
# ImageNet-1k top-1 at 224 px of pretrained timm models, from timm's results/results-imagenet.csv (commit aa4b5850)
TOP1 = {
    'convnextv2_base.fcmae_ft_in22k_in1k': 86.752,
    'beitv2_base_patch16_224.in1k_ft_in22k_in1k': 86.494,
    'seresnextaa101d_32x8d.sw_in12k_ft_in1k': 85.956,
    'convnext_base.fb_in22k_ft_in1k': 85.814,
    'caformer_s36.sail_in22k_ft_in1k': 85.780,
    'deit3_base_patch16_224.fb_in22k_ft_in1k': 85.728,
    'regnety_160.sw_in12k_ft_in1k': 85.596,
    'swin_base_patch4_window7_224.ms_in22k_ft_in1k': 85.276,
    'volo_d2_224.sail_in1k': 85.204,
    'vit_base_patch16_224.augreg2_in21k_ft_in1k': 85.108,
    'efficientvit_l2.r224_in1k': 85.046,
    'convnext_small.fb_in22k_ft_in1k': 84.582,
    'convnext_tiny.in12k_ft_in1k': 84.192,
    'volo_d1_224.sail_in1k': 84.148,
    'tresnet_v2_l.miil_in21k_ft_in1k': 83.910,
    'tresnet_m.miil_in21k_ft_in1k': 83.090,
    'deit3_small_patch16_224.fb_in22k_ft_in1k': 83.082,
    'levit_384.fb_dist_in1k': 82.600,
    'resnet101.a1h_in1k': 81.950,
    'tresnet_l.miil_in1k': 81.498,
    'resnet50.a1_in1k': 80.382,
}
# the built-in menu: CNNs and transformers from 82% to 87%, the paper's two among them (Table 4: TResNet-L, VOLO)
MENU = [
    'resnet101.a1h_in1k',
    'levit_384.fb_dist_in1k',
    'deit3_small_patch16_224.fb_in22k_ft_in1k',
    'tresnet_v2_l',
    'volo_d1_224',
    'convnext_tiny.in12k_ft_in1k',
    'efficientvit_l2.r224_in1k',
    'vit_base_patch16_224.augreg2_in21k_ft_in1k',
    'convnext_base.fb_in22k_ft_in1k',
    'convnextv2_base.fcmae_ft_in22k_in1k',
]
# The paper's Table 2 by timm name and family: one recipe for every one (OFA-595m is not in timm)
TABLE2 = {
    'resnet50': 'CNN',
    'tresnet_m': 'CNN',
    'convnext_small': 'CNN',
    'regnety_032': 'CNN',
    'vit_small_patch16_224': 'transformer',
    'levit_384': 'transformer',
    'swin_small_patch4_window7_224': 'transformer',
    'tnt_s_patch16_224': 'transformer',
    'efficientnet_b0': 'mobile',
    'mobilenetv3_large_100': 'mobile',
    'mixer_b16_224': 'MLP',
    'resmlp_12_224': 'MLP',
}

# ----------------------------------------------------------------------------------------------------------- the tables
# A student's row: the run; the student's speeds, alone and with KD; the teacher's; the largest batches (CUDA).
COLUMNS = ['model', 'teacher', 'device', 'batch_size', 'img_size',
           'infer_img_s', 'train_img_s', 'train_kd_img_s', 'kd_overhead', 'kd_ideal_img_s', 'kd_efficiency',
           'teacher_plain_img_s', 'teacher_prepared_img_s',
           'max_batch', 'max_batch_kd', 'recommended_batch']
# With --data: both data pipelines alone, then one of them feeding the training steps.
DATA_COLUMNS = ['data_workers', 'data_workers_img_s', 'data_device_img_s', 'bound_by', 'data_device_ops',
                'e2e_pipeline', 'train_e2e_img_s', 'train_kd_e2e_img_s']
TABLE2_COLUMNS = ['model', 'family', 'params_m', 'train_img_s', 'train_kd_img_s', 'kd_overhead']
MENU_COLUMNS = ['teacher', 'top1', 'params_m', 'teacher_img_s', 'train_kd_img_s', 'kd_overhead', 'pareto']
# Every other float is printed as a whole number.
FORMATS = {'top1': '{:.2f}', 'params_m': '{:.1f}', 'kd_overhead': '{:.1%}', 'kd_efficiency': '{:.3f}'}
# Timed steps by --device, where --steps does not say.
DEFAULT_STEPS = {'cuda': 30, 'cpu': 10}


# ---------------------------------------------------------------------------------------------------------------- flags

def exit_with(message):
    """argparse's errors as one line, instead of its usage and the error."""
    sys.stderr.write(f"bench.py: error: {message}\n")
    sys.exit(2)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = exit_with
    default_device = 'cpu'
    if torch.cuda.is_available():
        default_device = 'cuda'
    parser.add_argument('--model', default='resnet50', help='student, any timm name')
    parser.add_argument('--models', default='',
                        help="several students, comma separated (overrides --model); 'table2': the paper's Table 2, "
                             "one train and one KD step each, in one table")
    parser.add_argument('--teacher', default=train.TEACHER, help="teacher timm name, or 'none'")
    parser.add_argument('--batch_size', default='', help="per-device batch, or 'auto' (largest that fits x 0.85)")
    parser.add_argument('--img_size', type=int, default=train.IMG_SIZE,
                        help='image size of the synthetic batches (and of --data); transformers are built for it')
    parser.add_argument('--num_classes', type=int, default=1000, help="the models' classifier width")
    parser.add_argument('--device', default=default_device, choices=['cuda', 'cpu'],
                        help='where to time (default: cuda where there is one)')
    parser.add_argument('--compile', type=train.parse_bool, default=None, help='default: 1 on CUDA, 0 on CPU')
    parser.add_argument('--steps', type=int, default=0, help='timed steps (default: 30 on CUDA, 10 on CPU)')
    parser.add_argument('--data', default='', help='an ImageFolder root: also time the data pipeline')
    parser.add_argument('--workers', type=int, default=train.WORKERS, help="with --data: train.py's data workers")
    parser.add_argument('--data_pipeline', default='device', choices=['device', 'workers'],
                        help="what feeds the end-to-end steps (train_e2e_img_s) with --data")
    parser.add_argument('--json', default='', help='write all figures to this file')
    parser.add_argument('--teachers', default='', help="'menu' or timm names, comma separated: a teacher menu")
    parser.add_argument('--plot', default='', help='with --teachers: draw top-1 against train_kd_img_s (a PNG)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but no CUDA device is available')

    args.table2 = args.models == 'table2'
    if args.table2:
        args.models = list(TABLE2)
    elif args.models:
        args.models = args.models.split(',')
    else:
        args.models = [args.model]
    teachers = []
    for name in args.teachers.split(','):
        if name == 'menu':
            teachers += MENU
        elif name:
            teachers.append(name)
    args.teachers = teachers
    # An unknown name is refused here, before anything is timed.
    for name in args.models + [args.teacher] + args.teachers:
        if name != 'none' and not timm.is_model(name):
            parser.error(f"unknown model '{name}' (not in timm.list_models())")

    batch_is_number = args.batch_size.isdigit() and int(args.batch_size) > 1
    if args.batch_size not in ('', 'auto') and not batch_is_number:
        parser.error(f"--batch_size must be an integer > 1 or 'auto', got '{args.batch_size}'")
    if args.compile is None:
        args.compile = args.device == 'cuda'
    if not args.steps:
        args.steps = DEFAULT_STEPS[args.device]
    return args


# --------------------------------------------------------------------------------------------------------------- timing

def sync(device):
    """Waits for the work queued on the device: CUDA runs asynchronously, and the clock must see it done."""
    if device.type == 'cuda':
        torch.cuda.synchronize()


def img_per_sec(fn, batch, steps, device, warmup=None, median=False):
    """Images per second of fn() on `batch` images: warm-up calls (compilation, cudnn autotune), then timed. With
    `median` (CPU only: CUDA calls overlap), from the median call, which a shared host's bursts of stolen time
    (+-20% on 2 cores) do not move."""
    if not warmup:
        warmup = max(2, steps // 3)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        times.append(time.perf_counter())
        fn()
    sync(device)
    times.append(time.perf_counter())
    if median:
        calls = sorted(end - start for start, end in zip(times, times[1:]))
        return batch / calls[len(calls) // 2]
    return batch * steps / (times[-1] - times[0])


def steady_img_per_sec(args, batch, device):
    """img_per_sec for the teacher menu and Table 2, steady on the CPU too: there a step's first ~5 calls run at
    half speed, so it takes 6 warm-up calls, and the median call."""
    on_cpu = device.type == 'cpu'
    warmup = None
    if on_cpu:
        warmup = 6
    return functools.partial(img_per_sec, batch=batch, steps=args.steps, device=device, warmup=warmup,
                             median=on_cpu)


def fixed_batch(args, device, cpu_batch):
    """--batch_size where it is a number; otherwise 256 on CUDA and `cpu_batch` on the CPU."""
    if args.batch_size.isdigit():
        return int(args.batch_size)
    if device.type == 'cuda':
        return 256
    return cpu_batch


def repeated(images, labels):
    """The same batch at every step, its images copied each time: mixup mixes them in place."""
    while True:
        yield images.clone(), labels


def make_train_step(name, teacher, cfg, batch, device, compile, num_classes, autocast, batches=None):
    """A closure running train.py's train_step once, as train.py sets it up: on a fixed synthetic batch, or on the
    next of `batches` (train.py's data path, prepared by its helper thread while the step runs)."""
    memory_format = torch.contiguous_format
    if device.type == 'cuda':
        memory_format = torch.channels_last
    model = create_model(name, cfg.img_size, num_classes).to(device, memory_format=memory_format).train()
    optimizer, scheduler = train.make_optimizer(model, cfg, total_steps=10 ** 9)
    step_model = model
    if compile:
        step_model = torch.compile(model)
    mixup_fn = train.make_mixup(cfg, num_classes)
    fixed_images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    fixed_images = fixed_images.contiguous(memory_format=memory_format)
    fixed_labels = torch.randint(0, num_classes, (batch,), device=device)
    if batches is None:
        batches = repeated(fixed_images, fixed_labels)

    def step():
        # A batch of device_batches is (images, labels, bad): the step takes the first two.
        images, labels = next(batches)[:2]
        return train.train_step(step_model, teacher, images, labels, mixup_fn, optimizer, scheduler, cfg, autocast)
    return step


def student_steps(name, batch, args, cfg, device, autocast):
    """make_train_step for student `name` as this run sets it up: call it with a teacher (or None)."""
    return functools.partial(make_train_step, name, cfg=cfg, batch=batch, device=device, compile=args.compile,
                             num_classes=args.num_classes, autocast=autocast)


def make_inference(model, batch, img_size, device):
    """A closure running model's forward pass once, without gradients, on a fixed synthetic batch."""
    images = torch.randn(batch, 3, img_size, img_size, device=device)

    @torch.no_grad()
    def infer():
        return model(images)
    return infer


def teacher_variants(name, args, device):
    """The teacher at each step of its preparation, cumulative: plain eval mode, BN folded, channels-last, bf16
    and compiled, each where the device supports it; 'prepared' is prepare_teacher's defaults."""
    base = create_model(name, args.img_size, args.num_classes).eval().to(device)
    variants = {'plain': base}
    options = dict(channels_last=False, bf16=False, compile=False)
    stages = [('bn_folded', {}), ('channels_last', {'channels_last': True})]
    if has_fast_bf16(device):
        stages.append(('bf16', {'bf16': True}))
    if args.compile:
        stages.append(('compiled', {'compile': True}))
    for stage, change in stages:
        options.update(change)
        variants[stage] = prepare_teacher(copy.deepcopy(base), MEAN, STD, device, **options)
    variants['prepared'] = prepare_teacher(copy.deepcopy(base), MEAN, STD, device, compile=args.compile)
    return variants


def millions_of_parameters(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


# -------------------------------------------------------------------------------------------------------- the data path

def train_loader(cfg, batch, pipeline, **change):
    """train.py's training loader for --data_pipeline `pipeline`, and the config it was made with."""
    settings = vars(cfg) | {'data_pipeline': pipeline} | change
    cfg = argparse.Namespace(**settings)
    train_set = train.make_datasets(cfg, MEAN, STD)[0]
    loader = train.make_loader(train_set, batch, cfg, 0)
    return loader, cfg


def train_batches(cfg, batch, device, pipeline):
    """train.py's data path, its loader (--workers) and device_batches, epoch after epoch."""
    loader, cfg = train_loader(cfg, batch, pipeline)
    augment = None
    if pipeline == 'device':
        augment = train.Augment(cfg.img_size, True, MEAN)
    while True:
        yield from train.device_batches(loader, device, MEAN, STD, augment=augment)


def prefetched(workers):
    """Warm-up batches for train.py's data path: those its data workers prefetch, 2 each (counting at least one
    worker), and one more."""
    return 2 * max(1, workers) + 1


def data_pipeline_img_s(args, cfg, batch, device, pipeline):
    """img/s of train.py's data path alone, in steady state (after the workers' prefetched batches, 2 each).
    workers: PIL decodes and augments in the workers; device: they read bytes and draw, the device does the rest."""
    batches = train_batches(cfg, batch, device, pipeline)
    for _ in range(prefetched(args.workers)):
        next(batches)
    sync(device)
    start = time.perf_counter()
    images_timed = 0
    for images, _, _ in itertools.islice(batches, 3 * args.steps):
        images_timed += len(images)
    sync(device)
    return images_timed / (time.perf_counter() - start)


class CountOps(TorchDispatchMode):
    """Ops dispatched inside the block: on a GPU, each is a kernel launch the host makes. Views, allocations and
    JPEG decoding (one batched call on CUDA) are left out: torchvision 0.20's CPU decoder allocates through the
    dispatcher, an image at a time."""
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        allocation = func is torch.ops.aten.empty.memory_format
        if not func.is_view and not allocation and 'decode_jpeg' not in str(func):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def device_ops_per_batch(cfg, batch):
    """The device side of one training batch of --data_pipeline device (Augment), counted on the CPU."""
    loader, cfg = train_loader(cfg, batch, 'device', workers=0)
    images, labels, _ = next(iter(loader))
    with CountOps() as count:
        train.Augment(cfg.img_size, True, MEAN)(images, labels, torch.device('cpu'))
    return count.ops


# ----------------------------------------------------------------------------------------------------- the teacher menu

def tagged(name):
    """timm's name with its pretrained tag: an untagged name means timm's default tag for it."""
    pretrained = timm.get_pretrained_cfg(name)
    if '.' in name or not pretrained or not pretrained.tag:
        return name
    return f'{name}.{pretrained.tag}'


def beats(other, row):
    """Whether teacher `other` has both a higher top-1 than `row`'s and a faster KD step."""
    return other['top1'] > row['top1'] and other['train_kd_img_s'] > row['train_kd_img_s']


def pareto(rows):
    """Per row: no other teacher has both a higher top-1 and a faster KD step (None without both figures)."""
    known = [row for row in rows if row['top1'] is not None and row['train_kd_img_s'] is not None]
    flags = []
    for row in rows:
        flag = None
        if row in known:
            flag = not any(beats(other, row) for other in known)
        flags.append(flag)
    return flags


def kd_img_s(row):
    """A menu row's KD step img/s, 0 for a teacher without figures."""
    return row['train_kd_img_s'] or 0


def menu_row(name, plain, batch, timed, step, args, device):
    """One teacher of the menu, prepared as prepare_teacher leaves it, timed alone and in the student's KD step;
    `plain` is the student's step without KD."""
    row = dict.fromkeys(MENU_COLUMNS)
    row['teacher'] = name
    row['top1'] = TOP1.get(tagged(name))
    row['note'] = ''

    def measure():
        model = create_model(name, args.img_size, args.num_classes)
        teacher = prepare_teacher(model, MEAN, STD, device, compile=args.compile)
        row['params_m'] = millions_of_parameters(teacher)
        row['teacher_img_s'] = timed(make_inference(teacher, batch, args.img_size, device))
        row['train_kd_img_s'] = timed(step(teacher))

    # fits_in_memory releases the memory either way.
    try:
        if not fits_in_memory(measure):
            row['note'] = f"out of memory at batch {batch}"
    except Exception as e:
        # For example a transformer that cannot take this --img_size.
        row['note'] = f"fails: {first_line(e)[:80]}"
    if row['note']:
        row.update(teacher_img_s=None, train_kd_img_s=None, params_m=None)
    if row['train_kd_img_s'] is not None:
        row['kd_overhead'] = 1 - row['train_kd_img_s'] / plain
    return row


def teacher_menu(args, cfg, device, autocast):
    """Each teacher, prepared as prepare_teacher leaves it, timed alone and in the student's KD step (train.py's
    train_step), one at a time, each released before the next; the student's plain step once."""
    batch = fixed_batch(args, device, cpu_batch=16)
    timed = steady_img_per_sec(args, batch, device)
    step = student_steps(args.model, batch, args, cfg, device, autocast)
    plain = timed(step(None))
    rows = []
    for name in args.teachers:
        rows.append(menu_row(name, plain, batch, timed, step, args, device))
        gc.collect()
    for row, flag in zip(rows, pareto(rows)):
        row['pareto'] = flag
    # The fastest KD step first; the teachers without figures last, in the order given.
    rows.sort(key=kd_img_s, reverse=True)

    print(f"teacher menu for {args.model} at {args.img_size} px, batch {batch}, on {device_name(device)}, "
          f"{compiled_or_not(args)}; its plain step {plain:.0f} img/s")
    print_table(rows, MENU_COLUMNS + ['note'])
    student_top1 = TOP1.get(tagged(args.model))
    if student_top1 is not None:
        print(f"teacher must beat the student: {args.model}'s ImageNet top-1 is {student_top1}")
    # The notes are the table's: the rows returned, and written by --json, have the menu's columns alone.
    rows = [{column: row[column] for column in MENU_COLUMNS} for row in rows]
    if args.plot:
        plot_menu(rows, args)
    return rows


def plot_menu(rows, args):
    """Top-1 against the KD step's img/s, a point per teacher with both figures, and the Pareto front."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {args.plot}: needs matplotlib (pip install matplotlib)")
        return
    known = [row for row in rows if row['pareto'] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([row['train_kd_img_s'] for row in known], [row['top1'] for row in known])
    for row in known:
        # The name without its pretrained tag.
        label = row['teacher'].split('.')[0]
        point = (row['train_kd_img_s'], row['top1'])
        ax.annotate(label, point, fontsize=8, xytext=(3, 3), textcoords='offset points')
    front = sorted((row for row in known if row['pareto']), key=kd_img_s)
    ax.plot([row['train_kd_img_s'] for row in front], [row['top1'] for row in front], 'r-', label='Pareto front')
    batch = args.batch_size or 'default'
    ax.set(xlabel=f"{args.model}'s KD step with it, img/s", ylabel="teacher's ImageNet top-1 (%)",
           title=f'Which teacher for {args.model}: {args.img_size} px, batch {batch}')
    ax.legend()
    fig.savefig(args.plot, dpi=120, bbox_inches='tight')
    print(f"wrote {args.plot}")


# -------------------------------------------------------------------------------------------------- the paper's Table 2

def table2_row(name, teacher, batch, timed, step, args):
    """One backbone's training step alone and with the teacher, or the one-line reason it has no figures."""
    row = dict.fromkeys(TABLE2_COLUMNS)
    row['model'] = name
    row['family'] = TABLE2.get(name, '')
    row['note'] = ''

    def measure():
        model = create_model(name, args.img_size, args.num_classes)
        row['params_m'] = millions_of_parameters(model)
        # Only its size was wanted: each step builds its own model.
        del model
        row['train_img_s'] = timed(step(None))
        if teacher is not None:
            row['train_kd_img_s'] = timed(step(teacher))
            row['kd_overhead'] = 1 - row['train_kd_img_s'] / row['train_img_s']

    # fits_in_memory releases the memory either way.
    try:
        if not fits_in_memory(measure):
            row['note'] = f"out of memory at batch {batch}"
    except Exception as e:
        row['note'] = f"fails: {first_line(e)[:100]}"
    return row


def table2(args, cfg, device, autocast):
    """The paper's Table 2 on this machine: each backbone's training step alone and with the teacher (train.py's
    train_step, at --img_size), one row each; a backbone that fails gets its one-line reason instead of figures."""
    batch = fixed_batch(args, device, cpu_batch=16)
    timed = steady_img_per_sec(args, batch, device)
    teacher = None
    if args.teacher != 'none':
        model = create_model(args.teacher, args.img_size, args.num_classes)
        teacher = prepare_teacher(model, MEAN, STD, device, compile=args.compile)
    rows = []
    for name in args.models:
        step = student_steps(name, batch, args, cfg, device, autocast)
        rows.append(table2_row(name, teacher, batch, timed, step, args))
        gc.collect()
    print(f"the paper's Table 2 at {args.img_size} px, batch {batch}, on {device_name(device)}, teacher "
          f"{args.teacher}, {compiled_or_not(args)}")
    print_table(rows, TABLE2_COLUMNS + ['note'])
    return rows


# --------------------------------------------------------------------------------------------------------- the students

def fits_at_batch(model, teacher, args, cfg, device, autocast, batch):
    """Whether train.py's trial steps, those of its --batch_size auto, fit in device memory at `batch`."""
    trial = functools.partial(train.trial_steps, model, teacher, batch, cfg, args.num_classes, device, autocast)
    return fits_in_memory(trial)


def largest_batches(name, teacher, args, cfg, device, autocast):
    """max_batch, and max_batch_kd where there is a teacher: the largest batch of the student's step that fits,
    found by doubling, then bisection, on out-of-memory (as train.py's --batch_size auto)."""
    model = create_model(name, args.img_size, args.num_classes).to(device, memory_format=torch.channels_last)
    teachers = {'max_batch': None}
    if teacher is not None:
        teachers['max_batch_kd'] = teacher
    found = {}
    for key, kd_teacher in teachers.items():
        fits = functools.partial(fits_at_batch, model, kd_teacher, args, cfg, device, autocast)
        found[key] = find_max_batch(fits)
    return found


def bench_data_path(row, teacher, batch, timed, step, args, cfg, device):
    """With --data: both pipelines alone, each with --workers data workers; then --data_pipeline feeding the
    training steps, without and with KD."""
    workers_img_s = data_pipeline_img_s(args, cfg, batch, device, 'workers')
    device_img_s = data_pipeline_img_s(args, cfg, batch, device, 'device')
    # The step the data feeds is the KD step where there is a teacher: bound by the data when both are slower.
    step_img_s = row['train_img_s']
    if teacher is not None:
        step_img_s = row['train_kd_img_s']
    bound_by = 'compute'
    if max(workers_img_s, device_img_s) < step_img_s:
        bound_by = 'data'
    row['data_workers'] = args.workers
    row['data_workers_img_s'] = workers_img_s
    row['data_device_img_s'] = device_img_s
    row['bound_by'] = bound_by
    row['data_device_ops'] = device_ops_per_batch(cfg, batch)
    row['e2e_pipeline'] = args.data_pipeline
    # Without a teacher it stays None: the key is in the JSON either way.
    row['train_kd_e2e_img_s'] = None
    teachers = {'train_e2e_img_s': None}
    if teacher is not None:
        teachers['train_kd_e2e_img_s'] = teacher
    for key, kd_teacher in teachers.items():
        batches = train_batches(cfg, batch, device, args.data_pipeline)
        row[key] = timed(step(kd_teacher, batches=batches), warmup=prefetched(args.workers))


def bench_student(name, variants, teacher_speeds, args, cfg, device, autocast):
    """One student's row: largest batch (CUDA), inference, its training step with and without KD, the data path."""
    teacher = variants.get('prepared')
    batch = fixed_batch(args, device, cpu_batch=32)
    row = dict.fromkeys(COLUMNS)
    row['model'] = name
    row['teacher'] = args.teacher
    row['device'] = device_name(device)
    row['img_size'] = args.img_size
    if device.type == 'cuda':
        row.update(largest_batches(name, teacher, args, cfg, device, autocast))
        # Sized for the KD step where there is a teacher; for the plain step without one (max_batch_kd None) or
        # where not even the smallest KD batch fits (0).
        largest = row['max_batch_kd'] or row['max_batch']
        row['recommended_batch'] = usable_batch(largest)
        if args.batch_size == 'auto':
            batch = row['recommended_batch']
    row['batch_size'] = batch
    timed = functools.partial(img_per_sec, batch=batch, steps=args.steps, device=device)
    step = student_steps(name, batch, args, cfg, device, autocast)

    # Inference at its fastest, as a teacher runs: BN folded, channels-last, bf16 where the device has it.
    model = create_model(name, args.img_size, args.num_classes)
    student = prepare_teacher(model, MEAN, STD, device, compile=args.compile)
    row['infer_img_s'] = timed(make_inference(student, batch, args.img_size, device))
    row['train_img_s'] = timed(step(None))
    if teacher is not None:
        # The teacher's speeds depend on the batch only: measured once per batch, for every student.
        if batch not in teacher_speeds:
            speeds = {}
            for stage, variant in variants.items():
                speeds[stage] = timed(make_inference(variant, batch, args.img_size, device))
            teacher_speeds[batch] = speeds
        speeds = teacher_speeds[batch]
        row['teacher_steps_img_s'] = speeds
        kd = timed(step(teacher))
        # KD's speed if the teacher cost only its forward pass.
        ideal = 1 / (1 / row['train_img_s'] + 1 / speeds['prepared'])
        row['teacher_plain_img_s'] = speeds['plain']
        row['teacher_prepared_img_s'] = speeds['prepared']
        row['train_kd_img_s'] = kd
        row['kd_overhead'] = 1 - kd / row['train_img_s']
        row['kd_ideal_img_s'] = ideal
        row['kd_efficiency'] = kd / ideal
    if args.data:
        bench_data_path(row, teacher, batch, timed, step, args, cfg, device)
    return row


def student_table(args, cfg, device, autocast):
    """A row per student, then the teacher's img/s at each step of its preparation, per batch timed."""
    variants = {}
    if args.teacher != 'none':
        variants = teacher_variants(args.teacher, args, device)
    teacher_speeds = {}
    rows = [bench_student(name, variants, teacher_speeds, args, cfg, device, autocast) for name in args.models]
    columns = COLUMNS
    if args.data:
        columns = COLUMNS + DATA_COLUMNS
    print_table(rows, columns)
    for batch, speeds in teacher_speeds.items():
        print_teacher_steps(args.teacher, batch, speeds)
    return rows


# ------------------------------------------------------------------------------------------------------------- printing

def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name()
    return 'cpu'


def compiled_or_not(args):
    if args.compile:
        return 'compiled'
    return 'not compiled'


def fmt(column, value):
    if value is None:
        return 'n/a'
    if column in FORMATS:
        return FORMATS[column].format(value)
    if isinstance(value, float):
        return f'{value:.0f}'
    return str(value)


def print_table(rows, columns):
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    for row in rows:
        cells = [fmt(column, row.get(column)) for column in columns]
        print('| ' + ' | '.join(cells) + ' |')


def print_teacher_steps(teacher, batch, speeds):
    """The teacher's img/s after each step of its preparation, and its speed-up over the plain model."""
    steps = []
    for stage, img_s in speeds.items():
        steps.append(f"{stage} {img_s:.0f} ({img_s / speeds['plain']:.2f}x)")
    print(f"teacher {teacher} at batch {batch}, img/s by preparation step (cumulative): " + ', '.join(steps))


# -------------------------------------------------------------------------------------------------------------- the run

def main(argv=None):
    args = get_args(argv)
    device = torch.device('cpu')
    if args.device == 'cuda':
        # With its index, as train.py names it: device_batches' helper thread sets it as its own device.
        device = torch.device('cuda', 0)
    on_cuda = device.type == 'cuda'
    torch.backends.cuda.matmul.allow_tf32 = on_cuda
    torch.backends.cudnn.allow_tf32 = on_cuda
    torch.backends.cudnn.benchmark = on_cuda
    # As train.py: bf16 on CUDA only.
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_cuda)
    # train.py's config needs a --data: 'synthetic' stands for none.
    data = args.data or 'synthetic'
    cfg = train.get_config(['--data', data, '--img_size', str(args.img_size), '--workers', str(args.workers)])
    if args.teachers:
        results = teacher_menu(args, cfg, device, autocast)
    elif args.table2:
        results = table2(args, cfg, device, autocast)
    else:
        results = student_table(args, cfg, device, autocast)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
