"""
Surviving what clusters do to a 300-epoch run: preemption, kills, a diverging loss, unreadable files, hung or
dead data workers, a dead or hung peer, a batch that does not fit in memory. Nothing here is about the recipe:
train.py calls it in a few named places (init_process_group, the loaders, batch_sizes, resume, Watchdog,
checkpoint, one_line_errors).

What it guarantees (each failure is injected in test_train.py, for real but for three stand-ins: README, Tests):
- A run killed at any moment and continued with --resume trains bit for bit like an uninterrupted one: each
  sample's augmentation is seeded by (seed, epoch, position) (SeededSampler, RobustDataset), and last.pt holds
  the sampler's position and every rank's RNG states (checkpoint, resume).
- Checkpoints are written atomically (save_checkpoint): a kill or a full disk mid-write keeps the previous one.
- SIGTERM / SIGUSR1 stop every rank at the same step, after a checkpoint; a NaN/inf loss stops the run naming
  the step, before NaN weights could be written; too many unreadable files stop it (Watchdog).
- A hung or dead data worker ends the run with one line (worker_init, Watchdog.batches, one_line_errors).
- A rank that dies or hangs ends the others within seconds or --dist_timeout, with one line each, and
  torchrun --max-restarts then starts the group again, which --resume continues (init_process_group).
- --batch_size / --accum_steps auto find what fits in GPU memory, the same on every rank (batch_sizes).

train.py trains without this file, without these guarantees. Delete its import and: `Fail = SystemExit`;
timm's RepeatAugSampler for SeededSampler, the datasets for RobustDataset(...), no worker_init_fn; a fresh
progress dict for resume(...); `cfg.batch_size, cfg.accum_steps` for batch_sizes(...); torch.save of the
weights for checkpoint(...); `train_loader` for watchdog.batches(train_loader), and drop the other watchdog
lines, check_replicas_in_sync and the `with one_line_errors():`; dist.init_process_group(backend) for
init_process_group(...).
"""
import contextlib
import ctypes
import datetime
import functools
import gc
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler


# long runs on a cluster: train.py's flags for what is here (the recipe's constants are in train.py)
CKPT_MINUTES = 30.0               # also write last.pt mid-epoch this often: a kill loses at most this much
CHECK_EVERY = 10                  # steps between the ranks' agreement: signals, checkpoints, a NaN loss
LOADER_TIMEOUT = 300              # seconds a batch may take before a hung data-loading worker is an error
MAX_BAD_FILES = 0.01              # share of unreadable training files replaced before the dataset is broken
DIST_TIMEOUT = 300                # seconds a collective waits for a hung peer before failing (torch: 10-30 min)
# what --resume may change (paths and system settings); every other flag fixes the recipe and must match
FREE_KEYS = {'data', 'data_dir', 'teacher_checkpoint', 'workers', 'compile', 'eval_every', 'log_every', 'out_dir',
             'resume', 'ckpt_minutes', 'check_every', 'loader_timeout', 'max_bad_files', 'accum_steps', 'pretrained',
             'init_checkpoint', 'eval_checkpoint', 'dist_timeout', 'data_pipeline'}


class Fail(SystemExit):
    """A bad input or state: Python prints a SystemExit's message as one line and exits 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"{os.path.basename(sys.argv[0])}: error: {message}")


class SeededSampler(torch.utils.data.Sampler):
    """timm's RepeatAugSampler, yielding (index, seed) pairs.

    The seed fixes each sample's augmentation by (run seed, epoch, global position), whatever the persistent
    workers did before: a resumed run augments exactly like an uninterrupted one, and `start` skips what an
    interrupted epoch already trained on.
    selected_round=0: timm's default rounds an epoch down to a multiple of 256 images, dropping up to 255 a rank
    (all of them on a dataset under 256); with 0 an epoch is exactly one dataset long.
    With `accum` micro-batches a step, each micro-batch is the share of one virtual process (world x accum in
    all): on 1 process with --accum_steps 8, micro-batch m of a step holds the samples, and seeds, that process
    m of 8 holds in that step, so an image's repeats land in different BatchNorm batches and mixup pools.
    """

    def __init__(self, train_set, aug_repeats, world, rank, seed=0, accum=1, micro_batch=1):
        self.virtual = [RepeatAugSampler(train_set, num_replicas=world * accum, rank=rank * accum + m,
                                         num_repeats=aug_repeats, selected_round=0) for m in range(accum)]
        # The virtual processes in all, and the first of this process's.
        self.world = world * accum
        self.rank = rank * accum
        self.seed = seed
        self.micro_batch = micro_batch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        for sampler in self.virtual:
            sampler.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __len__(self):
        return sum(len(sampler) for sampler in self.virtual) - self.start

    def __iter__(self):
        # One share per virtual process, all equally long.
        shares = [list(sampler) for sampler in self.virtual]
        for n, (m, position) in enumerate(self.training_order(len(shares[0]))):
            # An interrupted epoch trained on its first `start` samples already.
            if n < self.start:
                continue
            seed = hash((self.seed, self.epoch, position * self.world + self.rank + m)) & (2 ** 62 - 1)
            yield shares[m][position], seed

    def training_order(self, share_length):
        """(virtual process m, position in m's share), in the order of training: step after step, a step's
        micro-batches one after the other, micro-batch m holding the next micro_batch positions of m's share."""
        for first in range(0, share_length, self.micro_batch):
            last = min(first + self.micro_batch, share_length)
            for m in range(len(self.virtual)):
                for position in range(first, last):
                    yield m, position


class RobustDataset(torch.utils.data.Dataset):
    """Seeds the augmentation of each sample, and replaces an unreadable file (corrupt, truncated, not an
    image) by the next one, returning its name so the main process can report and count it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        # SeededSampler gives (index, seed); any other sampler the index alone.
        index = item
        seed = None
        if isinstance(item, tuple):
            index, seed = item
        if seed is not None:
            # The CPU generator alone: torch.manual_seed would also queue a lazy CUDA seeding, formatting 3 stack
            # traces each time (0.2 ms a sample, more than reading its bytes).
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.default_generator.manual_seed(seed)
        # The first unreadable file met on the way to a readable one, '' if there was none.
        bad = ''
        for i in range(index, index + len(self.dataset)):
            try:
                image, label = self.dataset[i % len(self.dataset)]
                return image, label, bad
            except Exception as e:
                # PIL raises OSError, SyntaxError, ValueError... for broken files.
                if not bad:
                    bad = f"{self.file_name(i % len(self))} ({e})"
        raise RuntimeError(f"no readable file in the dataset: {bad}")

    def file_name(self, index):
        """The file's path where the dataset lists its samples (ImageFolder does), else its index."""
        samples = getattr(self.dataset, 'samples', None)
        if samples:
            return samples[index][0]
        return f'image #{index}'


def worker_init(_):
    # torchrun and Slurm signal the whole process group: the trainer stops and checkpoints, and its data workers
    # must live on until then (a failing trainer SIGKILLs them: one_line_errors).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # A trainer killed outright takes its workers along at once. Forked from it, they hold copies of its sockets
    # to the other ranks, who would see those close only when torch's check (every 5 s) ended the orphans.
    if sys.platform == 'linux':
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def rng_states():
    """Every rank's RNG states (torch, python, numpy, cuda), gathered for rank 0 to save."""
    np_state = np.random.get_state(legacy=False)
    state = {
        'torch': torch.get_rng_state(),
        'python': random.getstate(),
        'numpy_pos': np_state['state']['pos'],
        # numpy's key as a tensor: torch.load(weights_only=True) refuses numpy arrays.
        'numpy_key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
        'numpy_gauss': (np_state['has_gauss'], np_state['gauss']),
        'cuda': None,
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state):
    """Restores one rank's RNG states, as rng_states saved them."""
    torch.set_rng_state(state['torch'])
    # random.setstate accepts tuples only, so any list inside the saved state is turned back into one.
    python_state = tuple(tuple(x) if isinstance(x, list) else x for x in state['python'])
    random.setstate(python_state)
    numpy_key = state['numpy_key'].numpy().astype(np.uint32)
    np.random.set_state(('MT19937', numpy_key, state['numpy_pos'], *state['numpy_gauss']))
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


@contextlib.contextmanager
def signal_deferred(sig):
    """Holds back the Python handler of `sig` until the block is done, then runs it. (pthread_sigmask would not:
    another thread takes the signal, and the main thread still runs the handler at its next bytecode.)"""
    pending = []

    def hold(signum, frame):
        pending.append(signum)

    previous = signal.signal(sig, hold)
    try:
        yield
    finally:
        signal.signal(sig, previous)
        if pending and callable(previous):
            previous(sig, None)


def save_checkpoint(state, path):
    """Write a temp file, flush it to disk, then rename: a kill or a full disk mid-write never leaves a
    truncated checkpoint at `path`, and the previous one stays loadable. (torch.save alone writes in place.)"""
    tmp = path + '.tmp'
    try:
        # A dead worker's SIGCHLD waits: torch's handler raising inside torch.save's C++ writer would abort the
        # process.
        with signal_deferred(signal.SIGCHLD):
            with open(tmp, 'wb') as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise Fail(f"could not write {path} ({e}); the previous checkpoint there is kept")


def checkpoint(path, stateful, run, progress, raw_better=True):
    """Rank 0 writes last.pt or best.pt: the state of `stateful`, what identifies the run, the progress and
    every rank's RNG states. Never NaN weights."""
    if not all(p.isfinite().all() for p in stateful['model'].parameters()):
        raise Fail(f"non-finite weights at step {progress['step']}: not written; the {path} from before is kept")
    # Every rank builds the state, since rng_states gathers from all of them; rank 0 alone writes it.
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state |= run
    state |= progress
    state['rng'] = rng_states()
    state['bad_files'] = sorted(progress['bad_files'])
    # What timm.create_model(..., checkpoint_path=) loads: the better of raw and EMA.
    if raw_better:
        state['state_dict'] = stateful['model'].state_dict()
    else:
        state['state_dict'] = stateful['ema'].state_dict()
    if run['rank'] == 0:
        save_checkpoint(state, path)


def resume(path, run, stateful, log_path, log):
    """Continue from last.pt: refuse a checkpoint of another recipe, dataset or schedule; restore the weights,
    EMA, optimizer, lr schedule (`stateful`) and this rank's RNG states; drop log lines written after it.
    `run` is what identifies this run, as checkpoints store it. Returns the progress: the saved one, or a fresh
    start without `path` or with no last.pt yet (so that a requeue script can always pass --resume)."""
    fresh = {'epoch': 0, 'step': 0, 'epoch_step': 0, 'best': {'top1': -1.0, 'epoch': 0},
             'loss_sum': torch.zeros(2), 'bad_files': set()}
    if path is None:
        return fresh
    if not os.path.exists(path):
        log(f"resume: no {path} yet, starting fresh")
        return fresh
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise Fail(f"cannot read {path}: {str(e).splitlines()[0]}")
    check_continues(ckpt, run, path)
    for name, obj in stateful.items():
        obj.load_state_dict(ckpt[name])
    # On another process count, the per-rank seeds start afresh.
    if len(ckpt['rng']) == run['world_size']:
        set_rng_state(ckpt['rng'][run['rank']])
    # The epochs logged after last.pt was written are trained, and logged, again.
    if run['rank'] == 0 and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)['epoch'] <= ckpt['epoch']]
        with open(log_path, 'w') as f:
            f.writelines(kept)
    message = f"resume: {path} at epoch {ckpt['epoch']}, step {ckpt['step']}"
    if ckpt['epoch_step']:
        message += f" ({ckpt['epoch_step']} steps into epoch {ckpt['epoch'] + 1})"
    log(message)
    progress = {k: ckpt[k] for k in ('epoch', 'step', 'epoch_step', 'best', 'loss_sum')}
    progress['bad_files'] = set(ckpt['bad_files'])
    return progress


def check_continues(ckpt, run, path):
    """Refuses, in one line, a checkpoint that this run cannot continue: another recipe, dataset or schedule."""
    config = run['config']
    changed = []
    for key, saved in ckpt['config'].items():
        if key in FREE_KEYS or saved == config[key]:
            continue
        # --batch_size auto takes the batch that last.pt was trained with (batch_sizes).
        if key == 'batch_size' and config[key] == 'auto':
            continue
        changed.append(f"--{key} {saved} -> {config[key]}")
    if changed:
        # A different model or schedule is a different run, not a continuation.
        raise Fail(f"{path} was trained with another recipe ({', '.join(changed)}); "
                   f"resume with the same flags or use another --out_dir")
    if ckpt['num_classes'] != run['num_classes'] or ckpt['train_images'] != run['train_images']:
        raise Fail(f"{path} is for another dataset ({ckpt['num_classes']} classes, {ckpt['train_images']} "
                   f"training images; --data has {run['num_classes']} and {run['train_images']})")
    # Mid-epoch, another layout (processes, micro-batches a step) would change the rest of the epoch's order.
    saved_accum = ckpt.get('accum_steps', 1)
    run_accum = run.get('accum_steps', 1)
    same_layout = ckpt['world_size'] == run['world_size'] and saved_accum == run_accum
    if ckpt['total_steps'] != run['total_steps'] or (ckpt['epoch_step'] and not same_layout):
        raise Fail(f"{path} was written by {ckpt['world_size']} processes x {saved_accum} micro-batches "
                   f"({ckpt['total_steps']} steps in all, {ckpt['epoch_step']} into epoch {ckpt['epoch'] + 1}); on "
                   f"{run['world_size']} x {run_accum} the schedule or the epoch's order of samples would change: "
                   f"resume on {ckpt['world_size']} processes with --accum_steps {saved_accum}")


def first_in_context(error, kind, text=''):
    """`error`, or the first error of its context chain, that is a `kind` with `text` in its message; else None.
    A signal's handler raises wherever the main thread is: inside a queue's lock (the main thread waits on the
    helper thread's queue), what surfaces is the lock's own error ("release unlocked lock"), the signal's error
    its context. torch's SIGCHLD handler raises a data worker's death so; Ctrl-C raises KeyboardInterrupt."""
    while error is not None:
        if isinstance(error, kind) and text in str(error):
            return error
        error = error.__context__
    return None


class Watchdog:
    """What the training loop must notice without a device sync per step: preemption signals, a checkpoint
    falling due, a non-finite loss, unreadable files, a dead or hung data worker. The ranks agree on it every
    `check_every` steps with one small all-reduce, so they stop, checkpoint or fail at the same step."""

    def __init__(self, cfg, device, rank, train_images, bad_files, step):
        self.cfg = cfg
        self.device = device
        self.rank = rank
        self.train_images = train_images
        # The run's set of unreadable files, which its checkpoints keep.
        self.bad_files = bad_files
        # The last step check() saw: the step a data loading failure is reported at.
        self.step = step
        # The stop signals received, acted on at the next check.
        self.signals = []
        self.last_checkpoint = time.time()
        # The first step with a NaN/inf loss, 0 while there is none; on the device, so that no step waits on it.
        self.nonfinite_step = torch.zeros((), device=device, dtype=torch.long)
        # Slurm and Kubernetes send SIGTERM or SIGUSR1 before preemption: stop at a step boundary, exit 0.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        # Only noted here: check() stops every rank at the same step boundary.
        self.signals.append(signum)

    def batches(self, loader):
        """The loader's (images, labels); replaced files are named and counted, and a worker that died or hung
        past --loader_timeout ends the run with one line."""
        batches = iter(loader)
        # Seconds the loop stood waiting for the data workers.
        self.waited = 0.0
        while True:
            t_fetch = time.time()
            try:
                images, labels, bad = next(batches)
                self.waited += time.time() - t_fetch
            except StopIteration:
                return
            except RuntimeError as e:
                death = first_in_context(e, RuntimeError, 'DataLoader worker')
                cause = str(death or e).splitlines()[0]
                raise Fail(f"data loading failed at step {self.step}: {cause}") from None
            except (ConnectionError, EOFError) as e:
                # The worker died while handing over a batch's shared memory.
                raise Fail(f"data loading failed at step {self.step}: a data worker died while sending "
                           f"a batch ({type(e).__name__})") from None
            # RobustDataset's name of each sample's unreadable file, '' where it read the file.
            for name in filter(None, bad):
                if name not in self.bad_files:
                    print(f"rank {self.rank}: unreadable file replaced by the next one: {name}")
                self.bad_files.add(name)
            if len(self.bad_files) > self.cfg.max_bad_files * self.train_images:
                raise Fail(f"{len(self.bad_files)} unreadable training files (over {self.cfg.max_bad_files:.0%} "
                           f"of {self.train_images}): the dataset is broken, e.g. {sorted(self.bad_files)[0]}")
            yield images, labels

    def check(self, step, loss, epoch_end):
        """Every rank at once, every --check_every steps: a non-finite loss fails the run; a stop signal returns
        'stop' (the loop writes last.pt and exits 0), and --ckpt_minutes since the last checkpoint 'checkpoint' (the
        loop writes last.pt mid-epoch); else None."""
        self.step = step
        first_nonfinite = (self.nonfinite_step == 0) & ~loss.isfinite()
        self.nonfinite_step = torch.where(first_nonfinite, step, self.nonfinite_step)
        if step % self.cfg.check_every and not epoch_end:
            return None
        # A checkpoint falls due mid-epoch only: at an epoch's end the loop writes last.pt itself.
        due = time.time() - self.last_checkpoint > self.cfg.ckpt_minutes * 60 and not epoch_end
        # One all-reduce (the maximum over the ranks) tells every rank whether any has a stop signal or a
        # checkpoint due, and a step where one had a non-finite loss.
        flags = torch.tensor([float(bool(self.signals)), float(due)], device=self.device, dtype=torch.float64)
        flags = torch.cat([flags, self.nonfinite_step.double().view(1)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due, nonfinite_step = flags.tolist()
        if nonfinite_step:
            raise Fail(f"non-finite loss at step {int(nonfinite_step)}: the run diverged; the last.pt from before "
                       f"is kept (lower --lr, or check the data)")
        # The clock restarts at every last.pt, the one the loop writes at an epoch's end included.
        if stop or due or epoch_end:
            self.last_checkpoint = time.time()
        if stop:
            return 'stop'
        if due:
            return 'checkpoint'
        return None


def init_process_group(backend, rank, world, timeout_s):
    """DDP's process group, with a timeout (start and collectives) that turns a hung peer into an error. Under
    torchrun --max-restarts on one node, each restart gets its own keys: torchrun's agent keeps one store for
    all restarts, where a restarted rank reads a dead peer's address and fails to connect or hangs (pytorch#135712;
    3 restarts of 3 of an all-reduce script here). Across nodes each agent counts its own restarts: set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun there, which then starts a fresh store per restart."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    restart = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if restart is not None and int(os.environ.get('LOCAL_WORLD_SIZE', 0)) == world:
        # The rendezvous yields (store, rank, world): the store is all this needs.
        store, _, _ = next(dist.rendezvous('env://', rank, world, timeout=timeout))
        store = dist.PrefixStore(f'restart{restart}', store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def check_replicas_in_sync(model, log):
    """DDP keeps replicas bitwise equal; check it at the end of training, since a silent desync would waste the
    run."""
    if not dist.is_initialized():
        return
    total = sum(p.double().sum() for p in model.parameters())
    total_of_squares = sum(p.double().square().sum() for p in model.parameters())
    sums = torch.stack([total, total_of_squares])
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
    log(f"weights identical across {len(gathered)} ranks: {in_sync}")
    if not in_sync:
        raise Fail("the ranks' weights differ at the end of training")


def find_max_batch(fits, start=8, limit=1 << 16):
    """Largest even batch for which fits(batch) is true: double from `start` until it fails, then bisect."""
    # The largest batch known to fit, and the smallest known not to (None until one fails).
    good = 0
    bad = None
    while bad is None and start <= limit:
        if fits(start):
            good = start
            start *= 2
        else:
            bad = start
    while bad is not None and bad - good > 2:
        # An even batch, for mixup's pairs.
        mid = (good + bad) // 4 * 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def fits_in_memory(trial):
    """Whether trial() runs without running out of device memory, which would otherwise kill the run at its
    first step. cuDNN reports some lacks of memory as "unable to find an engine": the same."""
    try:
        trial()
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as e:
        if 'unable to find an engine' in str(e):
            return False
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def usable_batch(largest):
    """0.85 of the largest batch that fits (the paper advises 0.8-0.9: headroom for fragmentation), a multiple of 8."""
    return int(0.85 * largest) // 8 * 8


def largest_batch(trial, device):
    """The largest per-process batch for which trial(batch) fits in device memory, the smallest over the ranks,
    so that every rank takes the same. The RNGs that the trials draw from are left as they were."""

    def fits(batch):
        return fits_in_memory(functools.partial(trial, batch))

    rng_devices = []
    if torch.cuda.is_available():
        rng_devices = [device]
    with torch.random.fork_rng(devices=rng_devices):
        np_state = np.random.get_state()
        largest = torch.tensor(find_max_batch(fits))
        np.random.set_state(np_state)
    if dist.is_initialized():
        largest = largest.to(device)
        dist.all_reduce(largest, op=dist.ReduceOp.MIN)
    return largest.item()


def batch_sizes(cfg, world, last_path, device, log, trial):
    """(global batch, micro-batches per step): --batch_size and --accum_steps, where 'auto' takes 0.85 of the
    largest per-process batch for which trial(batch) fits in device memory (the paper advises 0.8-0.9), the same
    on every rank: running out of memory would kill the run at its first step. A resumed run keeps its batch."""
    if 'auto' not in (cfg.batch_size, cfg.accum_steps):
        return cfg.batch_size, cfg.accum_steps
    # The micro-batches a step that --batch_size auto goes with: --accum_steps, or 1 where that is auto too.
    given_accum = cfg.accum_steps
    if cfg.accum_steps == 'auto':
        given_accum = 1
    if cfg.batch_size == 'auto' and cfg.resume and os.path.exists(last_path):
        # A resumed run keeps the batch that last.pt was trained with.
        saved = torch.load(last_path, mmap=True, weights_only=True)
        return saved['config']['batch_size'], given_accum
    if device.type != 'cuda':
        raise Fail("--batch_size / --accum_steps auto search for what fits in GPU memory; they need CUDA")
    largest = largest_batch(trial, device)
    usable = usable_batch(largest)
    if usable < 2:
        raise Fail(f"--batch_size / --accum_steps auto: the largest batch that fits is {largest} per process, "
                   f"too small for mixup/cutmix pairs; use a smaller --model or --teacher, or a lower --img_size")

    if cfg.batch_size == 'auto':
        # Capped within the paper's range (Table 3 validates 512 to 3456 at the fixed lr 2e-3), and a multiple
        # of 8 per process, as usable_batch is.
        batch = min(usable, max(8, cfg.max_batch // world // 8 * 8))
        if batch == usable:
            log(f"batch: 0.85 of the largest that fits, {usable} per process, {usable * world} in all")
        else:
            log(f"batch: {batch} per process, {batch * world} in all, capped by --max_batch {cfg.max_batch} (the "
                f"largest global batch the paper validates at lr 2e-3); 0.85 of the largest that fits would be "
                f"{usable} per process, {usable * world} in all")
        return batch * world, given_accum

    # --accum_steps auto: the fewest micro-batches that fit; 1 image each if nothing does.
    batch = cfg.batch_size // world
    accum = batch
    for n in range(1, batch + 1):
        if batch % n == 0 and batch // n <= usable:
            accum = n
            break
    log(f"accumulation: {accum} micro-batches of {batch // accum} per process and step")
    return cfg.batch_size, accum


def stop_data_workers():
    """Kills this process's data workers, which ignore SIGTERM (worker_init). torch's SIGCHLD handler, which would
    report the kills, is silenced first: signal.signal first runs a pending handler, which may raise once more for
    a worker that died already; then it is tried again."""
    while True:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            break
        except RuntimeError:
            continue
    for worker in multiprocessing.active_children():
        worker.kill()


@contextlib.contextmanager
def one_line_errors():
    """Every failure ends as one line, and the data workers go with it: they ignore SIGTERM (worker_init), so
    they are killed here, or a hung one would block the exit. torch's SIGCHLD handler raises a worker's death
    as a RuntimeError wherever the main process happens to be: that too becomes one line, as does a collective
    that fails because a peer died or hung (torchrun then stops every rank, and --max-restarts resumes them)."""
    try:
        yield
        if dist.is_initialized():
            dist.destroy_process_group()
        # A run that ended well can still hold persistent data workers: multiprocessing's exit would send them
        # SIGTERM, which they ignore, and then wait for them forever.
        stop_data_workers()
    except BaseException as e:
        stop_data_workers()
        # Ctrl-C: the checkpoints written so far are kept, and --resume goes on from the last.
        if first_in_context(e, KeyboardInterrupt) is not None:
            raise Fail("interrupted (Ctrl-C); --resume goes on from the last last.pt") from None
        death = first_in_context(e, RuntimeError, 'DataLoader worker')
        if death is not None:
            raise Fail(f"data loading failed: {str(death).splitlines()[0].strip()}") from None
        # A lost peer: torch's DistError, or a RuntimeError from gloo, which names its source file (/gloo/) in all
        # but its timeout on a peer that was stopped and resumed ("pair closure").
        from_gloo = isinstance(e, RuntimeError) and re.search('/gloo/|pair closure', str(e))
        if isinstance(e, dist.DistError) or from_gloo:
            # The first line, without gloo's "[file:line] " prefix or torch's advice.
            cause = str(e).splitlines()[0]
            cause = re.sub(r'^\[[^]]*\] ', '', cause)
            cause = cause.split('. This is typically')[0]
            raise Fail(f"rank {os.getenv('RANK')}: lost contact with the other processes ({cause}): one died or "
                       f"hung, its own error says why; the last.pt from before is kept") from None
        raise
