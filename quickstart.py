"""
The whole scheme on a laptop CPU, in one command: a teacher trained without KD, a small student distilled
from it, and the same student without KD, on Fashion-MNIST (10,000 images at 32 px, 10 epochs); then their
table, and (with matplotlib) their validation top-1 per epoch in curves.png beside it. 16 minutes on a 2-core
Intel Xeon (34 on an older 2-core CPU; the README's figures). Run again, it goes on where it stopped: a finished
run is read from its folder, not trained again (seconds, for the table and curves.png), an interrupted one
resumes from its last.pt, and a folder made with other flags (quickstart_args.json says which) is moved aside.

    python quickstart.py                    # Fashion-MNIST, found or fetched (fashion_mnist below says from where)
    QUICKSTART_ARGS="--data DIR --epochs 1 --img_size 32" python quickstart.py   # any dataset, any flags
"""
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from torchvision import datasets

import train
from distill import first_line

SMALL = ('--data fashion-mnist --img_size 32 --batch_size 128 --train_subset 10000 --epochs 10 --eval_every 1 '
         '--workers 2').split()
RUNS = [  # name, out_dir, flags: the teacher's best.pt is a plain checkpoint of a timm resnet18
    ('teacher', 'teacher', '--model resnet18 --teacher none'),
    ('student with KD', 'student_kd', '--model mobilenetv3_small_100 --teacher resnet18 '
                                      '--teacher_checkpoint {out}/teacher/best.pt'),
    ('student without KD', 'student_nokd', '--model mobilenetv3_small_100 --teacher none'),
]
HERE = os.path.dirname(os.path.abspath(__file__))
ARGS_FILE = 'quickstart_args.json'  # in each run's folder: the train.py flags it was made with


DEBIAN = '/usr/share/datasets/fashion-mnist'  # where Debian's dataset-fashion-mnist puts the files
FILES = [f'{split}-{kind}-ubyte' for split in ('train', 't10k') for kind in ('images-idx3', 'labels-idx1')]


def fashion_mnist_from_debian(root, src=DEBIAN):
    """Unpack Debian's Fashion-MNIST files where torchvision reads them, so --data fashion-mnist works offline.
    (The Debian files are recompressed, so torchvision's own download/checksum path cannot use them.)"""
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    for name in FILES:
        if os.path.isdir(src) and not os.path.exists(os.path.join(raw, name)):
            os.makedirs(raw, exist_ok=True)
            # Runs started side by side write apart, and the file appears whole or not at all.
            tmp = os.path.join(raw, f'{name}.{os.getpid()}.tmp')
            with gzip.open(os.path.join(src, name + '.gz')) as f, open(tmp, 'wb') as out:
                shutil.copyfileobj(f, out)
            os.replace(tmp, os.path.join(raw, name))


def fashion_mnist(root):
    """Fashion-MNIST into `root`, from the first source that has it: already there; Debian's dataset-fashion-mnist
    if installed; torchvision's download; Debian's package fetched without root and without installing it
    (apt-get download, dpkg-deb -x), where apt-get exists: a machine that reaches only its package registries."""
    if all(os.path.exists(os.path.join(root, 'FashionMNIST', 'raw', name)) for name in FILES):
        return
    if os.path.isdir(DEBIAN):
        return fashion_mnist_from_debian(root, DEBIAN)
    try:
        for split in (True, False):
            datasets.FashionMNIST(root, train=split, download=True)
        return
    except Exception as e:
        # Offline: torchvision's mirrors are out of reach.
        offline = first_line(e)
    if not (shutil.which('apt-get') and shutil.which('dpkg-deb')):
        sys.exit(f"quickstart.py: error: no Fashion-MNIST in {root} and no download ({offline}); get it with "
                 f"'sudo apt-get install dataset-fashion-mnist' (Debian, Ubuntu) or on a machine with internet")
    print(f"Fashion-MNIST: no download ({offline}); fetching Debian's dataset-fashion-mnist with apt-get download "
          f"and dpkg-deb -x (no root, nothing installed)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(['apt-get', 'download', 'dataset-fashion-mnist'], cwd=tmp, capture_output=True)
        debs = glob.glob(os.path.join(tmp, '*.deb'))
        unpacked = False
        if fetched.returncode == 0 and debs:
            unpacked = subprocess.run(['dpkg-deb', '-x', debs[0], tmp]).returncode == 0
        if not unpacked:
            sys.exit("quickstart.py: error: apt-get download dataset-fashion-mnist failed; get Fashion-MNIST with "
                     "'sudo apt-get install dataset-fashion-mnist' or on a machine with internet")
        # The package's own path, under the folder it was unpacked into.
        fashion_mnist_from_debian(root, os.path.join(tmp, 'usr/share/datasets/fashion-mnist'))


def fashion_mnist_root(flags):
    """Where train.py will look for Fashion-MNIST given these flags, read by its own parser, or None when --data
    names another dataset."""
    cfg = train.get_config(flags)
    if cfg.data != 'fashion-mnist':
        return None
    return os.path.normpath(os.path.join(HERE, cfg.data_dir))


def read_log(run_dir):
    """A run's log.jsonl: one record per epoch, as train.py wrote them."""
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def read_top1(run_dir):
    """(epoch, val top-1: the better of raw and EMA) for each validated epoch of a run's log.jsonl."""
    validated = [record for record in read_log(run_dir) if record['val_top1'] is not None]
    return [(record['epoch'], max(record['val_top1'], record['ema_top1'])) for record in validated]


def finished(run_dir, epochs):
    """Whether a run was trained to its last epoch: log.jsonl ends with epoch `epochs`, and best.pt is there (the
    KD student's teacher is the teacher's best.pt)."""
    for name in ('log.jsonl', 'best.pt'):
        if not os.path.exists(os.path.join(run_dir, name)):
            return False
    records = read_log(run_dir)
    return len(records) > 0 and records[-1]['epoch'] == epochs


def made_with(run_dir):
    """The train.py flags that quickstart.py recorded in a run's folder, or None where it recorded none."""
    path = os.path.join(run_dir, ARGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def plot(runs, path):
    """Validation top-1 per epoch, one line per (name, run_dir), into `path`; without matplotlib, how to get it."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # a file, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"pip install matplotlib, then python quickstart.py again for {path} (top-1 per epoch): it "
                     f"takes seconds, the finished runs are read, not trained again")
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, run_dir in runs:
        axes.plot(*zip(*read_top1(run_dir)), marker='o', label=name)
    axes.set(xlabel='epoch', ylabel='val top-1 (%, best of raw and EMA)', title='USI quick start: Fashion-MNIST')
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120, bbox_inches='tight')
    print(f"{path}: top-1 per epoch")
    return figure


def train_run(name, run_dir, args):
    """One run of train.py with these flags, unless it finished earlier: then its folder is read. An interrupted
    run resumes from its last.pt; a folder made with other flags is moved aside. Returns the table's wall time."""
    epochs = train.get_config(args).epochs
    # A folder made with other flags holds another experiment: its numbers must not be printed as this one's.
    if os.path.isdir(run_dir) and os.listdir(run_dir) and made_with(run_dir) != args:
        number = 1
        while os.path.exists(f"{run_dir}.old{number}"):
            number += 1
        aside = f"{run_dir}.old{number}"
        os.rename(run_dir, aside)
        print(f"{name}: {run_dir} was made with other flags ({ARGS_FILE} differs or is missing): moved aside to "
              f"{aside}, training afresh", flush=True)
    if finished(run_dir, epochs):
        print(f"{name}: finished earlier, read from {run_dir}", flush=True)
        return 'done earlier'
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ARGS_FILE), 'w') as f:
        json.dump(args, f)
    command = [sys.executable, 'train.py', *args]
    # An interrupted run goes on from its last checkpoint instead of starting over.
    resumed = os.path.exists(os.path.join(run_dir, 'last.pt'))
    if resumed:
        command.append('--resume')
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    t0 = time.time()
    try:
        returncode = subprocess.run(command, cwd=HERE).returncode
    except KeyboardInterrupt:  # Ctrl-C stops train.py too; its last.pt holds the epochs it finished
        sys.exit(f"quickstart.py: interrupted in the {name} run; python quickstart.py again goes on from its last.pt")
    if returncode:
        sys.exit(f"quickstart.py: error: the {name} run failed (its output is above)")
    # A stop signal (SIGTERM) ends train.py with exit 0 and last.pt written, before its last epoch.
    if not finished(run_dir, epochs):
        sys.exit(f"quickstart.py: error: the {name} run stopped before epoch {epochs} or left no best.pt; "
                 f"python quickstart.py again resumes it (delete {run_dir} to start it over)")
    wall_time = f"{(time.time() - t0) / 60:.1f} min"
    if resumed:
        wall_time += ' (resumed)'
    return wall_time


def main(out='out/quickstart'):
    out = os.path.abspath(out)
    # QUICKSTART_ARGS come after SMALL: argparse lets the later flag win.
    flags = SMALL + os.environ.get('QUICKSTART_ARGS', '').split()
    os.makedirs(out, exist_ok=True)
    # Not when QUICKSTART_ARGS points --data elsewhere.
    root = fashion_mnist_root(flags)
    if root:
        fashion_mnist(root)
    rows = []
    curves = []
    for name, run_dir, run_flags in RUNS:
        run_dir = os.path.join(out, run_dir)
        args = [*run_flags.format(out=out).split(), *flags, '--out_dir', run_dir]
        wall_time = train_run(name, run_dir, args)
        top1 = max(top1 for _, top1 in read_top1(run_dir))
        model = run_flags.split()[1]
        rows.append(f"| {name} | {model} | {top1:.2f}% | {wall_time} |")
        curves.append((name, run_dir))
    print('\n| run | model | val top-1 (best of raw and EMA) | wall time |')
    print('|---|---|---|---|')
    print('\n'.join(rows))
    plot(curves, os.path.join(out, 'curves.png'))


if __name__ == '__main__':
    main(*sys.argv[1:])
