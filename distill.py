"""Knowledge distillation for USI (Ridnik et al., 2022): the KD loss and the teacher's preparation.

The paper's KD is deliberately vanilla: a KL divergence to the teacher's softmax, added to the cross entropy with
weight alpha_kd = 5 at temperature 1. It is cheap at scale because the teacher only ever runs inference: with its
BatchNorms folded into the convolutions, channels-last, bf16 and compiled, KD costs 10-20% of the training speed
instead of ~50%.
"""
import contextlib
import functools
import sys

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def kd_loss(student_logits, teacher_logits, tau=1.0):
    """tau^2 * KL(p_teacher(tau) || p_student(tau)), averaged over the batch.

    The tau^2 factor (Hinton et al., 2015) keeps the gradient's scale independent of tau, so alpha_kd means the
    same at every tau. In fp32: a bf16 log-softmax loses the small probabilities that carry the "dark knowledge".
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)
    return tau ** 2 * kl


def create_model(name, img_size, num_classes=None, pretrained=False, **model_kwargs):
    """timm.create_model for img_size x img_size images, with timm's model_kwargs (--model_kwargs).

    Architectures with a fixed input size (ViT, Swin, Mixer, ResMLP, TNT, LeViT) are built for img_size: timm
    reads it from the pretrained config's input_size, and resamples pretrained position embeddings to it.
    The size stays in model.pretrained_cfg, where prepare_teacher and load_weights read it.
    Every failure is a one-line ValueError.
    """
    overlay = {'input_size': (3, img_size, img_size)}
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **model_kwargs)
    except TypeError as e:
        # An argument the architecture does not have: "__init__() got an unexpected keyword argument 'x'".
        raise ValueError(f"'{name}' does not take these model arguments ({first_line(e)})")
    except RuntimeError as e:
        if not pretrained or 'size mismatch' not in str(e):
            raise
        # timm resamples position embeddings, but a Mixer's token MLP or a LeViT's attention biases have one
        # weight per position, and those cannot be resampled.
        default_size = timm.get_pretrained_cfg(name).input_size[-1]
        raise ValueError(f"the pretrained weights of '{name}' are made for {default_size} px images and cannot "
                         f"be adapted to {img_size} px: use --img_size {default_size}")


def check_input_size(name, img_size, **model_kwargs):
    """Builds the model on the meta device (no memory, no weights) and runs it on two img_size images.

    A size the architecture cannot take (an image smaller than one patch), or a model argument it does not have,
    is then a one-line ValueError before anything is loaded.
    """
    try:
        with torch.device('meta'):
            model = create_model(name, img_size, **model_kwargs)
            for layer_name, layer in model.named_modules():
                if type(layer).forward in PLAIN_CONVOLUTIONS:
                    layer.register_forward_pre_hook(functools.partial(check_kernel_fits, layer_name))
            model(torch.empty(2, 3, img_size, img_size))
    except NotImplementedError:
        # An op without a meta kernel says nothing about the size: building the real model will tell.
        pass
    except ValueError:
        # create_model's own one line: an argument the architecture does not take.
        raise
    except Exception as e:
        with_arguments = ''
        if model_kwargs:
            with_arguments = f" with --model_kwargs {model_kwargs}"
        raise ValueError(f"'{name}' cannot take {img_size} px images{with_arguments}: {first_line(e)}")


# torch's own convolutions, whose padding is their padding attribute. timm's "same" convolutions pad in their
# forward, and are left to the meta kernels.
PLAIN_CONVOLUTIONS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def check_kernel_fits(layer_name, conv, inputs):
    """A forward pre-hook: a convolution whose kernel is larger than its padded input fails, naming the layer.

    Only recent releases of torch check this on the meta device, and requirements.txt allows torch 2.5, whose meta
    convolution makes an empty output instead, so the real run would fail at its first step.
    """
    size = inputs[0].shape[2:]
    padding = conv.padding
    if padding == 'same':
        return
    if padding == 'valid':
        padding = (0,) * len(size)
    padded = [s + 2 * p for s, p in zip(size, padding)]
    kernel = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(p < k for p, k in zip(padded, kernel)):
        padded_text = ' x '.join(map(str, padded))
        kernel_text = ' x '.join(map(str, kernel))
        raise RuntimeError(f"layer {layer_name} has a {kernel_text} kernel, larger than its {padded_text} input")


def first_line(error):
    """The first line of an error's message, or the error's type where the message is empty."""
    message = str(error)
    if not message:
        return type(error).__name__
    return message.splitlines()[0]


def read_checkpoint(path):
    """torch.load of a checkpoint file onto the CPU; every failure is a one-line ValueError."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist")
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read: {first_line(e)}")


def load_weights(model, checkpoint, new_head=False, source=None):
    """Loads checkpoint (a path or a loaded dict) into model in place and returns model.

    Reads train.py's checkpoints (weights under 'state_dict'), timm's ('state_dict', 'model' or plain), DDP's and
    compiled ones. A head with another class count is refused, or with new_head=True left freshly initialized.
    Weights made for another input size are adapted as timm adapts its pretrained ones, or refused naming both
    sizes. Every failure is a one-line ValueError, naming the checkpoint by `source`, else by its path.
    """
    if isinstance(checkpoint, dict):
        named = f"checkpoint {source or 'dict'}"
    else:
        named = f"checkpoint {source or checkpoint}"
        checkpoint = read_checkpoint(checkpoint)
    # train.py's checkpoints say which size they were made for; a timm checkpoint does not.
    made_for = None
    state = {}
    if isinstance(checkpoint, dict):
        made_for = checkpoint.get('config', {}).get('img_size')
        state = checkpoint.get('state_dict', checkpoint.get('model', checkpoint))
    # DDP saves the weights under 'module.', a compiled model under '_orig_mod.'.
    state = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in state.items()}
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}

    # The classifier's name, or two for models with a distillation head (DeiT): ('head', 'head_dist').
    heads = cfg.get('classifier') or ()
    if isinstance(heads, str):
        heads = [heads]
    for head in heads:
        weight = head + '.weight'
        if weight not in state or weight not in own:
            continue
        checkpoint_classes = state[weight].shape[0]
        dataset_classes = own[weight].shape[0]
        if checkpoint_classes == dataset_classes:
            continue
        if not new_head:
            raise ValueError(f"{named} has {checkpoint_classes} classes, the dataset has {dataset_classes}")
        # Every head, a DeiT's distillation head too, keeps the model's fresh initialization.
        for key in [h + p for h in heads for p in ('.weight', '.bias')]:
            if key in own:
                state[key] = own[key]

    # timm's own conversion of its pretrained weights resamples position embeddings (ViT, DeiT, TNT) and
    # relative position bias tables (Swin) to the model's input size. What it cannot resample (a Mixer's
    # token MLPs, a LeViT's attention biases) stays as it was, and is refused below.
    filter_fn = getattr(sys.modules[type(model).__module__], 'checkpoint_filter_fn', None)
    if filter_fn and any(k in state and state[k].shape != own[k].shape for k in own):
        with contextlib.suppress(Exception):
            state = filter_fn(dict(state), model)

    mismatches = mismatched_tensors(state, own)
    model_size = cfg.get('input_size', (None,))[-1]
    if mismatches and made_for and model_size and made_for != model_size:
        raise ValueError(f"{named} was made for {made_for} px images and cannot be adapted to {model_size} px "
                         f"({mismatches[0]}): use --img_size {made_for}")
    if mismatches:
        architecture = cfg.get('architecture', type(model).__name__)
        raise ValueError(f"{named} does not fit model '{architecture}': "
                         f"{len(mismatches)} mismatched tensors ({mismatches[0]}, ...)")
    model.load_state_dict(state)
    return model


def mismatched_tensors(state, own):
    """What keeps the weights `state` from loading into a model whose state_dict() is `own`: one line a tensor."""
    missing = [f"missing {k}" for k in own if k not in state]
    unexpected = [f"unexpected {k}" for k in state if k not in own]
    wrong_shape = [f"wrong shape {k}" for k in own if k in state and state[k].shape != own[k].shape]
    return missing + unexpected + wrong_shape


def load_teacher(name, checkpoint=None, num_classes=1000, img_size=224):
    """A timm model for img_size images, from a local file (see load_weights) or the hub.

    A teacher that is one of train.py's own checkpoints is rebuilt with the model arguments it was trained with
    (--model_kwargs). Every failure is a one-line ValueError.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown teacher model '{name}' (not in timm.list_models())")
    if checkpoint:
        saved = read_checkpoint(checkpoint)
        # train.py's checkpoints hold the flags they were trained with; a timm checkpoint holds none.
        trained_with = {}
        if isinstance(saved, dict):
            trained_with = saved.get('config', {})
        if trained_with.get('model', name) != name:
            raise ValueError(f"checkpoint {checkpoint} is a '{trained_with['model']}', not the teacher '{name}'")
        model = create_model(name, img_size, num_classes, **trained_with.get('model_kwargs', {}))
        return load_weights(model, saved, source=checkpoint)
    try:
        model = create_model(name, img_size, pretrained=True)
    except ValueError:
        # create_model's own one line: weights that cannot be adapted to img_size.
        raise
    except Exception as e:
        raise ValueError(f"could not download pretrained weights for teacher '{name}' "
                         f"({type(e).__name__}): pass --teacher_checkpoint PATH or --teacher none")
    if model.num_classes != num_classes:
        raise ValueError(f"pretrained teacher '{name}' has {model.num_classes} classes, the dataset has "
                         f"{num_classes}: pass --teacher_checkpoint PATH of a teacher trained on this data")
    return model


def fuse_bn(model):
    """Folds every eval-mode BatchNorm that directly follows a conv or linear layer into it. Returns (model, count).

    In place (eval mode, submodules replaced): pass copy.deepcopy(model) to keep the original. "Follows" means
    registered right after a Conv/Linear sibling, which is true of torchvision and timm CNNs; prepare_teacher
    checks the outputs. (torch.fx fusion would need a traced graph, and many timm models do not trace.)
    timm's BatchNormAct2d keeps its drop and activation.
    """
    count = 0
    for parent in list(model.eval().modules()):
        children = list(parent.named_children())
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:]):
            fused = fused_with_bn(layer, bn)
            if fused is None:
                continue
            setattr(parent, layer_name, fused)
            if hasattr(bn, 'act'):
                setattr(parent, bn_name, nn.Sequential(bn.drop, bn.act))
            else:
                setattr(parent, bn_name, nn.Identity())
            count += 1
    return model, count


def fused_with_bn(layer, bn):
    """A copy of layer with the BatchNorm bn after it folded in, or None where that pair does not fold."""
    if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
        return fuse_conv_bn_eval(layer, bn)
    if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats:
        return fuse_linear_bn_eval(layer, bn)
    return None


class PreparedTeacher(nn.Module):
    """The teacher as train.py calls it: student-normalized batch in, fp32 logits out, no gradients."""

    def __init__(self, model, scale, shift, channels_last, dtype, folded_bn=0):
        super().__init__()
        self.model = model
        self.dtype = dtype
        # BatchNorms folded into the conv or linear before them: train.py logs it.
        self.folded_bn = folded_bn
        self.memory_format = torch.preserve_format
        if channels_last:
            self.memory_format = torch.channels_last
        self.register_buffer('scale', scale.view(1, -1, 1, 1))
        self.register_buffer('shift', shift.view(1, -1, 1, 1))

    @torch.no_grad()
    def forward(self, x):
        # From the student's normalization to the teacher's (prepare_teacher), then to the teacher's dtype.
        x = x * self.scale + self.shift
        x = x.to(self.dtype, memory_format=self.memory_format)
        return self.model(x).float()


def has_fast_bf16(device):
    """Whether bf16 pays on device: only with native instructions, those of CUDA GPUs since Ampere and of
    AVX512-BF16 or AMX CPUs (elsewhere oneDNN emulates it)."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    # Private torch.cpu functions: one that this torch lacks counts as no.
    for supported in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        if hasattr(torch.cpu, supported) and getattr(torch.cpu, supported)():
            return True
    return False


def prepare_teacher(model, student_mean, student_std, device='cpu', channels_last=True, bf16=None,
                    compile=False, fuse=True, teacher_mean=None, teacher_std=None):
    """Returns the teacher ready for KD: eval mode, no grads, BN folded, channels-last, bf16 where the device has
    native bf16 (resnet50 on a 2-core AVX512-BF16 CPU: 1.9x the plain fp32 teacher), optionally compiled.

    Modifies model in place and returns a PreparedTeacher wrapping it: pass copy.deepcopy(model) to keep the
    original. The student's loader normalizes with the student's mean/std, the teacher was trained with its own
    (TResNet: 0/1, ViTs: 0.5/0.5, ResNets: ImageNet's): teacher_mean/teacher_std if given, else its timm
    pretrained_cfg's. The batch is mapped exactly, x_t = (x_s * std_s + mean_s - mean_t) / std_t, rather than by
    a second data pipeline. The BN-fold check's probe input size is pretrained_cfg['input_size'], else
    (3, 224, 224).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if teacher_mean is None:
        teacher_mean = cfg.get('mean')
    if teacher_std is None:
        teacher_std = cfg.get('std')
    if teacher_mean is None or teacher_std is None:
        # A torchvision or user-built model: assuming ImageNet's statistics could be wrong.
        raise ValueError(f"teacher {type(model).__name__} has no pretrained_cfg: pass teacher_mean= and teacher_std=")
    device = torch.device(device)
    if bf16 is None:
        bf16 = has_fast_bf16(device)
    dtype = torch.float32
    if bf16:
        dtype = torch.bfloat16
    # Without gradients, the probes of fuse_bn_checked build no graph either.
    model = model.to(device).eval().requires_grad_(False)
    folded_bn = 0
    if fuse:
        model, folded_bn = fuse_bn_checked(model, cfg.get('input_size', (3, 224, 224)), device)

    memory_format = torch.contiguous_format
    if channels_last:
        memory_format = torch.channels_last
    model = model.to(dtype=dtype, memory_format=memory_format)
    if compile:
        # On CPU, inductor's freezing turns the fixed weights into prepacked oneDNN constants: +25%.
        options = None
        if device.type == 'cpu':
            options = {'freezing': True}
        model = torch.compile(model, options=options)

    student_mean = torch.as_tensor(student_mean, dtype=torch.float32)
    student_std = torch.as_tensor(student_std, dtype=torch.float32)
    teacher_mean = torch.as_tensor(teacher_mean, dtype=torch.float32)
    teacher_std = torch.as_tensor(teacher_std, dtype=torch.float32)
    # x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * scale + shift
    scale = student_std / teacher_std
    shift = (student_mean - teacher_mean) / teacher_std
    return PreparedTeacher(model, scale, shift, channels_last, dtype, folded_bn).to(device)


def fuse_bn_checked(model, input_size, device):
    """fuse_bn(model), refused with a one-line ValueError where it changes the outputs on a random batch."""
    probe = torch.randn(2, *input_size, device=device)
    # With TF32, a deep teacher's error nears the tolerance and a sound fold would be refused.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        before = model(probe)
        model, folded_bn = fuse_bn(model)
        # fuse_bn infers the dataflow from the order the layers are registered in: check it.
        after = model(probe)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    if not torch.allclose(before, after, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
        raise ValueError(f"fuse_bn changed {type(model).__name__}'s outputs: pass fuse=False")
    return model, folded_bn


def chance_threshold(num_classes):
    """Top-1 (percent) below which a teacher is taken as untrained: 10% of the way from chance to perfect."""
    chance = 100.0 / num_classes
    return chance + 0.1 * (100.0 - chance)
