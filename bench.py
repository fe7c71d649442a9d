"""
What USI training costs on this machine, in the spirit of the paper's Table 10 (inference and training img/s,
largest batch) and Table 3 (the price of KD). Synthetic data, warm-up steps, then timed steps with the device
synchronized. The training step is train.py's own `train_step`, imported, not copied.

    python bench.py --model resnet50 --teacher tresnet_v2_l                 # GPU, 224 px
    python bench.py --model resnet18 --teacher resnet50 --img_size 64 --device cpu
    python bench.py --models resnet50,tresnet_m --batch_size auto --data /path/to/imagenet  # + both data paths
"""
import argparse
import copy
import functools
import itertools
import json
import time

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import train
from distill import has_fast_bf16, prepare_teacher
from resilience import find_max_batch, fits_in_memory, usable_batch


def get_args(argv=None):
    parser = argparse.ArgumentParser(description='USI throughput benchmark')
    parser.error = lambda msg: parser.exit(2, f"bench.py: error: {msg}\n")
    parser.add_argument('--model', default='resnet50', help='student, any timm name')
    parser.add_argument('--models', default='', help='several students, comma separated (overrides --model)')
    parser.add_argument('--teacher', default=train.TEACHER, help="teacher timm name, or 'none'")
    parser.add_argument('--batch_size', default='', help="per-device batch, or 'auto' (largest that fits x 0.85)")
    parser.add_argument('--img_size', type=int, default=train.IMG_SIZE)
    parser.add_argument('--num_classes', type=int, default=1000)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    parser.add_argument('--compile', type=train.parse_bool, default=None, help='default: 1 on CUDA, 0 on CPU')
    parser.add_argument('--steps', type=int, default=0, help='timed steps (default: 30 on CUDA, 10 on CPU)')
    parser.add_argument('--data', default='', help='an ImageFolder root: also time the data pipeline')
    parser.add_argument('--workers', type=int, default=train.WORKERS)
    parser.add_argument('--json', default='', help='write all figures to this file')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but no CUDA device is available')
    for name in (args.models.split(',') if args.models else [args.model]) + [args.teacher]:
        if name != 'none' and not timm.is_model(name):
            parser.error(f"unknown model '{name}' (not in timm.list_models())")
    if args.batch_size not in ('', 'auto') and not (args.batch_size.isdigit() and int(args.batch_size) > 1):
        parser.error(f"--batch_size must be an integer > 1 or 'auto', got '{args.batch_size}'")
    args.compile = args.device == 'cuda' if args.compile is None else args.compile
    args.steps = args.steps or (30 if args.device == 'cuda' else 10)
    return args


def sync(device):
    torch.cuda.synchronize() if device.type == 'cuda' else None


def img_per_sec(fn, batch, steps, device, warmup=None):
    """Images per second of fn() on `batch` images: warm-up calls (compilation, cudnn autotune), then timed."""
    for _ in range(warmup or max(2, steps // 3)):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def make_train_step(name, teacher, cfg, batch, device, compile, num_classes, autocast):
    """A closure running train.py's train_step once on a fixed synthetic batch, as train.py sets it up."""
    on_cuda = device.type == 'cuda'
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    model = timm.create_model(name, num_classes=num_classes).to(device, memory_format=memory_format).train()
    optimizer, scheduler = train.make_optimizer(model, cfg, total_steps=10 ** 9)
    step_model = torch.compile(model) if compile else model
    mixup_fn = train.make_mixup(cfg, num_classes)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return lambda: train.train_step(step_model, teacher, images.clone(), labels, mixup_fn, optimizer, scheduler,
                                    cfg, autocast)


def make_inference(model, batch, img_size, device):
    return torch.no_grad()(functools.partial(model, torch.randn(batch, 3, img_size, img_size, device=device)))


def teacher_variants(name, args, device):
    """The teacher at each step of its preparation, cumulative: plain eval mode, BN folded, channels-last, bf16
    and compiled, each where the device supports it; 'prepared' is prepare_teacher's defaults."""
    base = timm.create_model(name, num_classes=args.num_classes).eval()
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # synthetic data: any normalization will do
    variants, options = {'plain': base.to(device)}, dict(channels_last=False, bf16=False, compile=False)
    stages = [('bn_folded', {}), ('channels_last', {'channels_last': True})]
    stages += [('bf16', {'bf16': True})] if has_fast_bf16(device) else []
    stages += [('compiled', {'compile': True})] if args.compile else []
    for stage, change in stages:
        options.update(change)
        variants[stage] = prepare_teacher(copy.deepcopy(base), mean, std, device, **options)
    variants['prepared'] = prepare_teacher(copy.deepcopy(base), mean, std, device, compile=args.compile)
    return variants


def data_pipeline_img_s(args, cfg, batch, device, pipeline):
    """img/s of train.py's data path in steady state (after the workers' prefetched batches, 2 each). workers: PIL
    decodes and augments in the workers; device: they read bytes and draw, the device does the rest."""
    cfg = argparse.Namespace(**vars(cfg) | {'data_pipeline': pipeline})
    loader = train.make_loader(train.make_datasets(cfg, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0], batch, cfg, 0)
    batches = train.device_batches(loader, device, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, augment=train.Augment(
        cfg.img_size, True, IMAGENET_DEFAULT_MEAN) if pipeline == 'device' else None)
    for _ in range(min(2 * max(1, args.workers) + 1, len(loader) - 1)):  # what the workers prefetched
        next(batches)
    sync(device)
    t0, timed = time.perf_counter(), 0
    for images, _, _ in itertools.islice(batches, 3 * args.steps):
        timed += len(images)
    sync(device)
    return timed / (time.perf_counter() - t0)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == 'cuda'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = on_cuda
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_cuda)  # as train.py: bf16 on CUDA only
    cfg = train.get_config(['--data', args.data or 'synthetic', '--img_size', str(args.img_size),
                            '--workers', str(args.workers)])
    variants = teacher_variants(args.teacher, args, device) if args.teacher != 'none' else {}
    teacher = variants.get('prepared')
    results, teacher_speeds = [], {}  # the teacher's speeds depend on the batch only: measured once per batch
    for name in args.models.split(',') if args.models else [args.model]:
        batch = int(args.batch_size) if args.batch_size.isdigit() else (256 if on_cuda else 32)
        row = dict(model=name, teacher=args.teacher, device=torch.cuda.get_device_name() if on_cuda else 'cpu',
                   img_size=args.img_size, max_batch=None, max_batch_kd=None, recommended_batch=None)
        if on_cuda:  # largest batch that fits: doubling, then bisection, on out-of-memory (as train.py's auto)
            model = timm.create_model(name, num_classes=args.num_classes).to(device, memory_format=torch.channels_last)
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
        if teacher is not None:
            if batch not in teacher_speeds:
                teacher_speeds[batch] = {stage: timed(make_inference(m, batch, args.img_size, device))
                                         for stage, m in variants.items()}
            speeds = row['teacher_steps_img_s'] = teacher_speeds[batch]
            row.update(teacher_plain_img_s=speeds['plain'], teacher_prepared_img_s=speeds['prepared'])
        student = timm.create_model(name, num_classes=args.num_classes)
        student = prepare_teacher(student, (0.5,) * 3, (0.5,) * 3, device, compile=args.compile)
        row['infer_img_s'] = timed(make_inference(student, batch, args.img_size, device))
        row['train_img_s'] = timed(train_step(None))
        row.update(train_kd_img_s=None, kd_overhead=None, kd_ideal_img_s=None, kd_efficiency=None)
        if teacher is not None:
            kd = timed(train_step(teacher))
            # if the teacher cost only its prepared forward pass, KD would run at this speed
            ideal = 1 / (1 / row['train_img_s'] + 1 / row['teacher_prepared_img_s'])
            row.update(train_kd_img_s=kd, kd_overhead=1 - kd / row['train_img_s'], kd_ideal_img_s=ideal,
                       kd_efficiency=kd / ideal)
        if args.data:  # both pipelines, each with --workers data workers
            data = {p: data_pipeline_img_s(args, cfg, batch, device, p) for p in ('workers', 'device')}
            slower = max(data.values()) < (row['train_kd_img_s'] or row['train_img_s'])  # than the step, both
            row.update(data_workers=args.workers, data_workers_img_s=data['workers'], data_device_img_s=data['device'],
                       bound_by='data' if slower else 'compute')
        results.append(row)
    print_table(results)
    for batch, speeds in teacher_speeds.items():
        print(f"teacher {args.teacher} at batch {batch}, img/s by preparation step (cumulative): " +
              ', '.join(f"{k} {v:.0f} ({v / speeds['plain']:.2f}x)" for k, v in speeds.items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


def fmt(column, value):
    if value is None or column in ('kd_overhead', 'kd_efficiency'):
        return 'n/a' if value is None else f'{value:.1%}' if column == 'kd_overhead' else f'{value:.3f}'
    return f'{value:.0f}' if isinstance(value, float) else str(value)


def print_table(results):
    columns = ['model', 'teacher', 'device', 'batch_size', 'img_size', 'infer_img_s', 'train_img_s', 'train_kd_img_s',
               'kd_overhead', 'kd_ideal_img_s', 'kd_efficiency', 'teacher_plain_img_s', 'teacher_prepared_img_s',
               'max_batch', 'max_batch_kd', 'recommended_batch']
    if any('data_device_img_s' in r for r in results):
        columns += ['data_workers', 'data_workers_img_s', 'data_device_img_s', 'bound_by']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    for row in results:
        print('| ' + ' | '.join(fmt(c, row.get(c)) for c in columns) + ' |')


if __name__ == '__main__':
    main()
