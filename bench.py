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
import time

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD  # synthetic data: any will do
from torch.utils._python_dispatch import TorchDispatchMode

import train
from distill import create_model, has_fast_bf16, prepare_teacher
from resilience import find_max_batch, fits_in_memory, usable_batch

# ImageNet-1k top-1 at 224 px of pretrained timm models, from timm's results/results-imagenet.csv (commit aa4b5850)
TOP1 = {'convnextv2_base.fcmae_ft_in22k_in1k': 86.752, 'beitv2_base_patch16_224.in1k_ft_in22k_in1k': 86.494,
        'seresnextaa101d_32x8d.sw_in12k_ft_in1k': 85.956, 'convnext_base.fb_in22k_ft_in1k': 85.814,
        'caformer_s36.sail_in22k_ft_in1k': 85.780, 'deit3_base_patch16_224.fb_in22k_ft_in1k': 85.728,
        'regnety_160.sw_in12k_ft_in1k': 85.596, 'swin_base_patch4_window7_224.ms_in22k_ft_in1k': 85.276,
        'volo_d2_224.sail_in1k': 85.204, 'vit_base_patch16_224.augreg2_in21k_ft_in1k': 85.108,
        'efficientvit_l2.r224_in1k': 85.046, 'convnext_small.fb_in22k_ft_in1k': 84.582,
        'convnext_tiny.in12k_ft_in1k': 84.192, 'volo_d1_224.sail_in1k': 84.148,
        'tresnet_v2_l.miil_in21k_ft_in1k': 83.910, 'tresnet_m.miil_in21k_ft_in1k': 83.090,
        'deit3_small_patch16_224.fb_in22k_ft_in1k': 83.082,
        'levit_384.fb_dist_in1k': 82.600, 'resnet101.a1h_in1k': 81.950, 'tresnet_l.miil_in1k': 81.498,
        'resnet50.a1_in1k': 80.382}
# the built-in menu: CNNs and transformers from 82% to 87%, the paper's two among them (Table 4: TResNet-L, VOLO)
MENU = ['resnet101.a1h_in1k', 'levit_384.fb_dist_in1k', 'deit3_small_patch16_224.fb_in22k_ft_in1k', 'tresnet_v2_l',
        'volo_d1_224', 'convnext_tiny.in12k_ft_in1k', 'efficientvit_l2.r224_in1k',
        'vit_base_patch16_224.augreg2_in21k_ft_in1k', 'convnext_base.fb_in22k_ft_in1k',
        'convnextv2_base.fcmae_ft_in22k_in1k']
# The paper's Table 2 by timm name and family: one recipe for every one (OFA-595m is not in timm)
TABLE2 = {'resnet50': 'CNN', 'tresnet_m': 'CNN', 'convnext_small': 'CNN', 'regnety_032': 'CNN',
          'vit_small_patch16_224': 'transformer', 'levit_384': 'transformer',
          'swin_small_patch4_window7_224': 'transformer', 'tnt_s_patch16_224': 'transformer',
          'efficientnet_b0': 'mobile', 'mobilenetv3_large_100': 'mobile',
          'mixer_b16_224': 'MLP', 'resmlp_12_224': 'MLP'}
COLUMNS = ['model', 'teacher', 'device', 'batch_size', 'img_size', 'infer_img_s', 'train_img_s', 'train_kd_img_s',
           'kd_overhead', 'kd_ideal_img_s', 'kd_efficiency', 'teacher_plain_img_s', 'teacher_prepared_img_s',
           'max_batch', 'max_batch_kd', 'recommended_batch']
DATA_COLUMNS = ['data_workers', 'data_workers_img_s', 'data_device_img_s', 'bound_by', 'data_device_ops',
                'e2e_pipeline', 'train_e2e_img_s', 'train_kd_e2e_img_s']
TABLE2_COLUMNS = ['model', 'family', 'params_m', 'train_img_s', 'train_kd_img_s', 'kd_overhead']
MENU_COLUMNS = ['teacher', 'top1', 'params_m', 'teacher_img_s', 'train_kd_img_s', 'kd_overhead', 'pareto']
FORMATS = {'top1': '{:.2f}', 'params_m': '{:.1f}', 'kd_overhead': '{:.1%}', 'kd_efficiency': '{:.3f}'}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda msg: parser.exit(2, f"bench.py: error: {msg}\n")
    parser.add_argument('--model', default='resnet50', help='student, any timm name')
    parser.add_argument('--models', default='',
                        help="several students, comma separated (overrides --model); 'table2': the paper's Table 2, "
                             "one train and one KD step each, in one table")
    parser.add_argument('--teacher', default=train.TEACHER, help="teacher timm name, or 'none'")
    parser.add_argument('--batch_size', default='', help="per-device batch, or 'auto' (largest that fits x 0.85)")
    parser.add_argument('--img_size', type=int, default=train.IMG_SIZE,
                        help='image size of the synthetic batches (and of --data); transformers are built for it')
    parser.add_argument('--num_classes', type=int, default=1000, help="the models' classifier width")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'],
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
    else:
        args.models = args.models.split(',') if args.models else [args.model]
    args.teachers = [t for name in args.teachers.split(',') if name for t in (MENU if name == 'menu' else [name])]
    for name in args.models + [args.teacher] + args.teachers:
        if name != 'none' and not timm.is_model(name):
            parser.error(f"unknown model '{name}' (not in timm.list_models())")
    if args.batch_size not in ('', 'auto') and not (args.batch_size.isdigit() and int(args.batch_size) > 1):
        parser.error(f"--batch_size must be an integer > 1 or 'auto', got '{args.batch_size}'")
    args.compile = args.device == 'cuda' if args.compile is None else args.compile
    args.steps = args.steps or (30 if args.device == 'cuda' else 10)
    return args


def sync(device):
    torch.cuda.synchronize() if device.type == 'cuda' else None


def img_per_sec(fn, batch, steps, device, warmup=None, median=False):
    """Images per second of fn() on `batch` images: warm-up calls (compilation, cudnn autotune), then timed. With
    `median` (CPU only: CUDA calls overlap), from the median call, which a shared host's bursts of stolen time
    (+-20% on 2 cores) do not move."""
    for _ in range(warmup or max(2, steps // 3)):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        times.append(time.perf_counter())
        fn()
    sync(device)
    times.append(time.perf_counter())
    calls = sorted(b - a for a, b in zip(times, times[1:]))
    return batch / calls[len(calls) // 2] if median else batch * steps / (times[-1] - times[0])


def make_train_step(name, teacher, cfg, batch, device, compile, num_classes, autocast, batches=None):
    """A closure running train.py's train_step once, as train.py sets it up: on a fixed synthetic batch, or on the
    next of `batches` (train.py's data path, prepared by its helper thread while the step runs)."""
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    model = create_model(name, cfg.img_size, num_classes).to(device, memory_format=memory_format).train()
    optimizer, scheduler = train.make_optimizer(model, cfg, total_steps=10 ** 9)
    step_model = torch.compile(model) if compile else model
    mixup_fn = train.make_mixup(cfg, num_classes)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return lambda: train.train_step(step_model, teacher, *((images.clone(), labels) if batches is None else
                                                           next(batches)[:2]), mixup_fn, optimizer, scheduler,
                                    cfg, autocast)


def make_inference(model, batch, img_size, device):
    return torch.no_grad()(functools.partial(model, torch.randn(batch, 3, img_size, img_size, device=device)))


def teacher_variants(name, args, device):
    """The teacher at each step of its preparation, cumulative: plain eval mode, BN folded, channels-last, bf16
    and compiled, each where the device supports it; 'prepared' is prepare_teacher's defaults."""
    base = create_model(name, args.img_size, args.num_classes).eval()
    variants, options = {'plain': base.to(device)}, dict(channels_last=False, bf16=False, compile=False)
    stages = [('bn_folded', {}), ('channels_last', {'channels_last': True})]
    stages += [('bf16', {'bf16': True})] if has_fast_bf16(device) else []
    stages += [('compiled', {'compile': True})] if args.compile else []
    for stage, change in stages:
        options.update(change)
        variants[stage] = prepare_teacher(copy.deepcopy(base), MEAN, STD, device, **options)
    variants['prepared'] = prepare_teacher(copy.deepcopy(base), MEAN, STD, device, compile=args.compile)
    return variants


def train_loader(cfg, batch, pipeline, **change):
    """train.py's training loader for --data_pipeline `pipeline`."""
    cfg = argparse.Namespace(**vars(cfg) | {'data_pipeline': pipeline} | change)
    return train.make_loader(train.make_datasets(cfg, MEAN, STD)[0], batch, cfg, 0), cfg


def train_batches(cfg, batch, device, pipeline):
    """train.py's data path, its loader (--workers) and device_batches, epoch after epoch."""
    loader, cfg = train_loader(cfg, batch, pipeline)
    augment = train.Augment(cfg.img_size, True, MEAN) if pipeline == 'device' else None
    while True:
        yield from train.device_batches(loader, device, MEAN, STD, augment=augment)


def data_pipeline_img_s(args, cfg, batch, device, pipeline):
    """img/s of train.py's data path alone, in steady state (after the workers' prefetched batches, 2 each).
    workers: PIL decodes and augments in the workers; device: they read bytes and draw, the device does the rest."""
    batches = train_batches(cfg, batch, device, pipeline)
    for _ in range(2 * max(1, args.workers) + 1):  # what the workers prefetched
        next(batches)
    sync(device)
    t0, timed = time.perf_counter(), 0
    for images, _, _ in itertools.islice(batches, 3 * args.steps):
        timed += len(images)
    sync(device)
    return timed / (time.perf_counter() - t0)


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


def tagged(name):
    """timm's name with its pretrained tag: an untagged name means timm's default tag for it."""
    cfg = timm.get_pretrained_cfg(name)
    return name if '.' in name or not (cfg and cfg.tag) else f'{name}.{cfg.tag}'


def pareto(rows):
    """Per row: no other teacher has both a higher top-1 and a faster KD step (None without both figures)."""
    known = [r for r in rows if r['top1'] is not None and r['train_kd_img_s'] is not None]
    return [None if r not in known else not any(o['top1'] > r['top1'] and o['train_kd_img_s'] > r['train_kd_img_s']
                                                for o in known) for r in rows]


def teacher_menu(args, cfg, device, autocast):
    """Each teacher, prepared as prepare_teacher leaves it, timed alone and in the student's KD step (train.py's
    train_step), one at a time, each released before the next; the student's plain step once."""
    batch = int(args.batch_size) if args.batch_size.isdigit() else (256 if device.type == 'cuda' else 16)
    on_cpu = device.type == 'cpu'  # a CPU step's first ~5 calls run at half speed: 6 warm-up calls there
    timed = functools.partial(img_per_sec, batch=batch, steps=args.steps, device=device, warmup=6 if on_cpu else None,
                              median=on_cpu)
    step = functools.partial(make_train_step, args.model, cfg=cfg, batch=batch, device=device, compile=args.compile,
                             num_classes=args.num_classes, autocast=autocast)
    plain, rows = timed(step(None)), []
    for name in args.teachers:
        row = dict.fromkeys(MENU_COLUMNS) | dict(teacher=name, top1=TOP1.get(tagged(name)), note='')

        def measure():
            teacher = prepare_teacher(create_model(name, args.img_size, args.num_classes), MEAN, STD, device,
                                      compile=args.compile)
            row['params_m'] = sum(p.numel() for p in teacher.parameters()) / 1e6
            row['teacher_img_s'] = timed(make_inference(teacher, batch, args.img_size, device))
            row['train_kd_img_s'] = timed(step(teacher))
        try:  # fits_in_memory releases the memory either way
            row['note'] = '' if fits_in_memory(measure) else f"out of memory at batch {batch}"
        except Exception as e:  # e.g. a transformer that cannot take this --img_size
            row['note'] = f"fails: {str(e).splitlines()[0][:80]}"
        if row['note']:
            row.update(teacher_img_s=None, train_kd_img_s=None, params_m=None)
        row['kd_overhead'] = row['train_kd_img_s'] and 1 - row['train_kd_img_s'] / plain
        rows.append(row)
        gc.collect()
    for row, flag in zip(rows, pareto(rows)):
        row['pareto'] = flag
    rows.sort(key=lambda r: -(r['train_kd_img_s'] or 0))
    print(f"teacher menu for {args.model} at {args.img_size} px, batch {batch}, on {device_name(device)}, "
          f"{'compiled' if args.compile else 'not compiled'}; its plain step {plain:.0f} img/s")
    print_table(rows, MENU_COLUMNS + ['note'])
    if TOP1.get(tagged(args.model)) is not None:
        print(f"teacher must beat the student: {args.model}'s ImageNet top-1 is {TOP1[tagged(args.model)]}")
    rows = [{k: r[k] for k in MENU_COLUMNS} for r in rows]
    if args.plot:
        plot_menu(rows, args)
    return rows


def plot_menu(rows, args):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"--plot {args.plot}: needs matplotlib (pip install matplotlib)")
    known = [r for r in rows if r['pareto'] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r['train_kd_img_s'] for r in known], [r['top1'] for r in known])
    for r in known:
        ax.annotate(r['teacher'].split('.')[0], (r['train_kd_img_s'], r['top1']), fontsize=8, xytext=(3, 3),
                    textcoords='offset points')
    front = sorted((r for r in known if r['pareto']), key=lambda r: r['train_kd_img_s'])
    ax.plot([r['train_kd_img_s'] for r in front], [r['top1'] for r in front], 'r-', label='Pareto front')
    ax.set(xlabel=f"{args.model}'s KD step with it, img/s", ylabel="teacher's ImageNet top-1 (%)",
           title=f'Which teacher for {args.model}: {args.img_size} px, batch {args.batch_size or "default"}')
    ax.legend()
    fig.savefig(args.plot, dpi=120, bbox_inches='tight')
    print(f"wrote {args.plot}")


def table2(args, cfg, device, autocast):
    """The paper's Table 2 on this machine: each backbone's training step alone and with the teacher (train.py's
    train_step, at --img_size), one row each; a backbone that fails gets its one-line reason instead of figures."""
    batch = int(args.batch_size) if args.batch_size.isdigit() else (256 if device.type == 'cuda' else 16)
    on_cpu = device.type == 'cpu'
    timed = functools.partial(img_per_sec, batch=batch, steps=args.steps, device=device, warmup=6 if on_cpu else None,
                              median=on_cpu)
    teacher = None
    if args.teacher != 'none':
        teacher = prepare_teacher(create_model(args.teacher, args.img_size, args.num_classes), MEAN, STD, device,
                                  compile=args.compile)
    rows = []
    for name in args.models:
        row = dict.fromkeys(TABLE2_COLUMNS) | dict(model=name, family=TABLE2.get(name, ''), note='')
        step = functools.partial(make_train_step, name, cfg=cfg, batch=batch, device=device, compile=args.compile,
                                 num_classes=args.num_classes, autocast=autocast)

        def measure():
            model = create_model(name, args.img_size, args.num_classes)
            row['params_m'] = sum(p.numel() for p in model.parameters()) / 1e6
            del model
            row['train_img_s'] = timed(step(None))
            if teacher is not None:
                row['train_kd_img_s'] = timed(step(teacher))
                row['kd_overhead'] = 1 - row['train_kd_img_s'] / row['train_img_s']
        try:  # fits_in_memory releases the memory either way
            if not fits_in_memory(measure):
                row['note'] = f"out of memory at batch {batch}"
        except Exception as e:
            row['note'] = f"fails: {str(e).splitlines()[0][:100]}"
        rows.append(row)
        gc.collect()
    print(f"the paper's Table 2 at {args.img_size} px, batch {batch}, on {device_name(device)}, teacher "
          f"{args.teacher}, {'compiled' if args.compile else 'not compiled'}")
    print_table(rows, TABLE2_COLUMNS + ['note'])
    return rows


def bench_student(name, variants, teacher_speeds, args, cfg, device, autocast):
    """One student's row: largest batch (CUDA), inference, its training step with and without KD, the data path."""
    on_cuda, teacher = device.type == 'cuda', variants.get('prepared')
    batch = int(args.batch_size) if args.batch_size.isdigit() else (256 if on_cuda else 32)
    row = dict.fromkeys(COLUMNS) | dict(model=name, teacher=args.teacher, device=device_name(device),
                                        img_size=args.img_size)
    if on_cuda:  # largest batch that fits: doubling, then bisection, on out-of-memory (as train.py's auto)
        model = create_model(name, args.img_size, args.num_classes).to(device, memory_format=torch.channels_last)
        for key, kd_teacher in [('max_batch', None)] + ([('max_batch_kd', teacher)] if teacher else []):
            row[key] = find_max_batch(lambda b: fits_in_memory(
                lambda: train.trial_steps(model, kd_teacher, b, cfg, args.num_classes, device, autocast)))
        del model
        row['recommended_batch'] = usable_batch(row['max_batch_kd'] or row['max_batch'])
        batch = row['recommended_batch'] if args.batch_size == 'auto' else batch
    row['batch_size'] = batch
    timed = functools.partial(img_per_sec, batch=batch, steps=args.steps, device=device)
    train_step = functools.partial(make_train_step, name, cfg=cfg, batch=batch, device=device, compile=args.compile,
                                   num_classes=args.num_classes, autocast=autocast)
    student = prepare_teacher(create_model(name, args.img_size, args.num_classes), MEAN, STD, device,
                              compile=args.compile)
    row['infer_img_s'] = timed(make_inference(student, batch, args.img_size, device))
    row['train_img_s'] = timed(train_step(None))
    if teacher is not None:  # the teacher's speeds depend on the batch only: measured once per batch
        if batch not in teacher_speeds:
            teacher_speeds[batch] = {stage: timed(make_inference(m, batch, args.img_size, device))
                                     for stage, m in variants.items()}
        speeds = row['teacher_steps_img_s'] = teacher_speeds[batch]
        kd = timed(train_step(teacher))
        ideal = 1 / (1 / row['train_img_s'] + 1 / speeds['prepared'])  # KD if the teacher cost only its forward pass
        row.update(teacher_plain_img_s=speeds['plain'], teacher_prepared_img_s=speeds['prepared'], train_kd_img_s=kd,
                   kd_overhead=1 - kd / row['train_img_s'], kd_ideal_img_s=ideal, kd_efficiency=kd / ideal)
    if args.data:  # both pipelines alone, each with --workers data workers; then one feeding the steps
        data = {p: data_pipeline_img_s(args, cfg, batch, device, p) for p in ('workers', 'device')}
        slower = max(data.values()) < (row['train_kd_img_s'] or row['train_img_s'])  # than the step, both
        row.update(data_workers=args.workers, data_workers_img_s=data['workers'], data_device_img_s=data['device'],
                   bound_by='data' if slower else 'compute', data_device_ops=device_ops_per_batch(cfg, batch),
                   e2e_pipeline=args.data_pipeline, train_kd_e2e_img_s=None)
        for key, kd_teacher in [('train_e2e_img_s', None)] + ([('train_kd_e2e_img_s', teacher)] if teacher else []):
            batches = train_batches(cfg, batch, device, args.data_pipeline)
            row[key] = timed(train_step(kd_teacher, batches=batches), warmup=2 * max(1, args.workers) + 1)
    return row


def main(argv=None):
    args = get_args(argv)
    device = torch.device('cpu')
    if args.device == 'cuda':
        # With its index, as train.py names it: device_batches' helper thread sets it as its own device.
        device = torch.device('cuda', 0)
    on_cuda = device.type == 'cuda'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = on_cuda
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_cuda)  # as train.py: bf16 on CUDA only
    cfg = train.get_config(['--data', args.data or 'synthetic', '--img_size', str(args.img_size),
                            '--workers', str(args.workers)])
    if args.teachers:
        results = teacher_menu(args, cfg, device, autocast)
    elif args.table2:
        results = table2(args, cfg, device, autocast)
    else:
        variants = teacher_variants(args.teacher, args, device) if args.teacher != 'none' else {}
        teacher_speeds = {}
        results = [bench_student(name, variants, teacher_speeds, args, cfg, device, autocast) for name in args.models]
        print_table(results, COLUMNS + (DATA_COLUMNS if args.data else []))
        for batch, speeds in teacher_speeds.items():
            print(f"teacher {args.teacher} at batch {batch}, img/s by preparation step (cumulative): " +
                  ', '.join(f"{k} {v:.0f} ({v / speeds['plain']:.2f}x)" for k, v in speeds.items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


def device_name(device):
    return torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'


def fmt(column, value):
    if value is None:
        return 'n/a'
    return FORMATS.get(column, '{:.0f}' if isinstance(value, float) else '{}').format(value)


def print_table(rows, columns):
    print('| ' + ' | '.join(columns) + ' |\n|' + '---|' * len(columns))
    for row in rows:
        print('| ' + ' | '.join(fmt(c, row.get(c)) for c in columns) + ' |')


if __name__ == '__main__':
    main()
