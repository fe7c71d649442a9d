"""
Knowledge distillation for USI (Ridnik et al., 2022): the KD loss and the teacher's preparation.

The paper's KD is deliberately vanilla: the teacher's softmax is the target of a KL divergence, added to
the usual cross entropy with weight alpha_kd = 5 at temperature 1. What makes it cheap at scale is the
teacher's preparation: it only ever runs inference, so its BatchNorms are folded into the convolutions,
it runs channels-last in bf16 and compiled, and KD costs 10-20% of the training speed instead of ~50%.
"""
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def kd_loss(student_logits, teacher_logits, tau=1.0):
    """tau^2 * KL(p_teacher(tau) || p_student(tau)), averaged over the batch.

    The tau^2 factor (Hinton et al., 2015) keeps the gradient's scale independent of the temperature, so
    alpha_kd means the same thing at every tau. Computed in fp32: a bf16 log-softmax loses the small
    probabilities that carry the teacher's "dark knowledge".
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return tau ** 2 * F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)


def load_teacher(name, checkpoint=None, num_classes=1000):
    """A timm model: from a local file (timm/state-dict checkpoint or train.py's best.pt) or the hub.

    Raises ValueError with a one-line message for every way this can go wrong, so train.py can print it.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown teacher model '{name}' (not in timm.list_models())")
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location='cpu', weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"teacher checkpoint {checkpoint} does not exist")
        except Exception as e:
            raise ValueError(f"teacher checkpoint {checkpoint} cannot be read: {str(e).splitlines()[0]}")
        # train.py's checkpoints keep their best weights under 'state_dict'; timm's keep 'state_dict' or 'model'
        if isinstance(state, dict):
            state = state.get('state_dict', state.get('model', state))
        state = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in state.items()}
        model = timm.create_model(name, num_classes=num_classes)
        head = model.pretrained_cfg.get('classifier', '') + '.weight'
        if head in state and state[head].shape[0] != num_classes:
            raise ValueError(f"teacher checkpoint {checkpoint} has {state[head].shape[0]} classes, "
                             f"the dataset has {num_classes}")
        own = model.state_dict()
        bad = ([f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
               + [f"wrong shape {k}" for k in own if k in state and state[k].shape != own[k].shape])
        if bad:
            raise ValueError(f"teacher checkpoint {checkpoint} does not fit model '{name}': {len(bad)} "
                             f"mismatched tensors ({bad[0]}, ...)")
        model.load_state_dict(state)
        return model
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise ValueError(f"could not download pretrained weights for teacher '{name}' "
                         f"({type(e).__name__}): pass --teacher_checkpoint PATH or --teacher none")
    if model.num_classes != num_classes:
        raise ValueError(f"pretrained teacher '{name}' has {model.num_classes} classes, the dataset has "
                         f"{num_classes}: pass --teacher_checkpoint PATH of a teacher trained on this data")
    return model


def fuse_bn(model):
    """Fold every eval-mode BatchNorm that directly follows a conv or linear into it. Returns (model, count).

    "Follows" is read from registration order: a BN registered right after a Conv/Linear sibling is taken
    to consume its output, which holds for torchvision and timm CNNs (prepare_teacher checks the outputs,
    so a model where it does not hold is caught). timm's BatchNormAct2d keeps its activation (and drop).
    torch.fx-based fusion would not need that assumption but fails on many timm models that do not trace.
    """
    model.eval()
    count = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (first_name, first), (bn_name, bn) in zip(children, children[1:]):
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
                continue
            if isinstance(first, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(first, bn)
            elif isinstance(first, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                fused = fuse_linear_bn_eval(first, bn)
            else:
                continue
            setattr(parent, first_name, fused)
            rest = [m for m in (getattr(bn, 'drop', None), getattr(bn, 'act', None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            count += 1
    return model, count


class PreparedTeacher(nn.Module):
    """The teacher as train.py calls it: student-normalized batch in, fp32 logits out, no gradients."""

    def __init__(self, model, scale, shift, channels_last, dtype):
        super().__init__()
        self.model, self.channels_last, self.dtype = model, channels_last, dtype
        self.register_buffer('scale', scale.view(1, -1, 1, 1))
        self.register_buffer('shift', shift.view(1, -1, 1, 1))

    @torch.no_grad()
    def forward(self, x):
        x = (x * self.scale + self.shift).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


def has_fast_bf16(device):
    """bf16 pays only with native instructions: CUDA since Ampere, CPUs with AVX512-BF16 or AMX (else
    oneDNN emulates it, slower than fp32)."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def prepare_teacher(model, student_mean, student_std, device='cpu', channels_last=True, bf16=None,
                    compile=False, fuse=True):
    """Returns the teacher ready for KD: eval mode, no grads, BN folded, channels-last, bf16 where the device
    has native bf16 (resnet50 on a 2-core AVX512-BF16 CPU: 1.9x the plain fp32 teacher), optionally compiled.

    The student's loader normalizes with the student's mean/std; the teacher was trained with its own
    (TResNet: 0/1, many ViTs: 0.5/0.5, ResNets: ImageNet's). Rather than a second data pipeline, the batch is
    mapped exactly: x_t = (x_s * std_s + mean_s - mean_t) / std_t, an affine per channel.
    """
    device = torch.device(device)
    dtype = torch.bfloat16 if (has_fast_bf16(device) if bf16 is None else bf16) else torch.float32
    model = model.to(device).eval().requires_grad_(False)
    if fuse:
        probe = torch.randn(2, *model.pretrained_cfg.get('input_size', (3, 224, 224)), device=device)
        with torch.no_grad():
            before = model(probe)
            model, _ = fuse_bn(model)
            after = model(probe)
        # fuse_bn infers the dataflow from registration order; refuse silently wrong arithmetic
        if not torch.allclose(before, after, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
            raise ValueError(f"fuse_bn changed {type(model).__name__}'s outputs: pass fuse=False")
    cfg = model.pretrained_cfg
    t_mean = torch.tensor(cfg.get('mean', IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
    t_std = torch.tensor(cfg.get('std', IMAGENET_DEFAULT_STD), dtype=torch.float32)
    s_mean, s_std = torch.tensor(student_mean, dtype=torch.float32), torch.tensor(student_std, dtype=torch.float32)
    scale, shift = s_std / t_std, (s_mean - t_mean) / t_std
    model = model.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile:  # on CPU, inductor's freezing turns the fixed weights into prepacked oneDNN constants: +25%
        model = torch.compile(model, options={'freezing': True} if device.type == 'cpu' else None)
    return PreparedTeacher(model, scale, shift, channels_last, dtype).to(device)


def chance_threshold(num_classes):
    """Top-1 (percent) below which a teacher is taken as untrained: 10% of the way from chance to perfect."""
    chance = 100.0 / num_classes
    return chance + 0.1 * (100.0 - chance)

