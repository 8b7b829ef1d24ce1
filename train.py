"""
Train DisCon in two stages (README.md):
  stage 1: the tokenizer (continuous latent grid c and its quantised view d), then its per-channel latent statistics;
  stage 2: on the frozen tokenizer, the discrete prior p(d | y) and the continuous model p(c | d, y), side by side.
The same script runs on a CPU, one GPU, or under torchrun (DDP is chosen from RANK / LOCAL_RANK / WORLD_SIZE):
  python train.py                                                # quick preset: built-in shapes, both stages, CPU ok
  python train.py --preset cifar10 --out_dir runs/cifar10         # one GPU
  torchrun --nproc_per_node 8 train.py --preset imagenet64 --out_dir runs/in64
  python train.py --stage 2 --tokenizer out/tokenizer.pt --mode continuous --out_dir out_continuous
  (any of these) --resume                                         # continue from the checkpoints in --out_dir
Every config field is a flag (--n_layer 6, --tokenizer.latent_channels 8), spelt with underscores as the field is
(--model-steps is read as --model_steps); `python train.py --help` lists them, grouped by config, with their defaults
under the chosen --preset.
"""
import argparse
import copy
import functools
import glob
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import socket
import sys
import tarfile
import tempfile
import time
import tokenize
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import discon
from fid import IMAGE_EXTENSIONS, HelpFormatter, atomic_write, image_files, parse_flags, positive, read_rgb


@dataclass
class TrainConfig:
    dataset: str = "shapes"       # shapes (built in) | cifar10 | imagenet64 | folder
    data_dir: str = "data"        # where cifar10 / imagenet64 files are (or get downloaded / converted), or the folder
    out_dir: str = "out"          # checkpoints (tokenizer.pt, model.pt), log.jsonl, PNG grids
    stage: str = "both"           # 1 (tokenizer) | 2 (the prior and the continuous model) | both
    tokenizer: str = ""           # stage 2: path of the stage-1 checkpoint to build on, empty: out_dir/tokenizer.pt
                                  # (not to be confused with the --tokenizer.NAME flags, TokenizerConfig's fields)
    resume: bool = False          # continue each stage from its checkpoint in out_dir
    seed: int = 0
    batch_size: int = 32          # global: per optimizer step, split over processes and accumulation steps
    grad_accum: int = 1
    tokenizer_steps: int = 1500   # the defaults (and the quick preset) take about 12 minutes on 2 CPU cores (README's)
    tokenizer_lr: float = 3e-3
    model_steps: int = 7000
    model_lr: float = 3e-3
    warmup: float = 0.05          # fraction of a stage's steps with a linear warmup
    schedule: str = "cosine"      # cosine (down to lr/10, as nanoGPT) | constant (as MAR)
    weight_decay: float = 0.02    # MAR
    beta2: float = 0.95           # AdamW betas (0.9, 0.95): MAR, LlamaGen
    grad_clip: float = 1.0        # LlamaGen; 0 = off
    ema_decay: float = 0.999
    log_every: int = 50
    sample_every: int = 1000      # PNG grid: reconstructions (stage 1) or samples (stage 2)
    ckpt_every: int = 500
    compile: bool = False         # torch.compile the stage-2 model (stage 1 stays eager: README.md says why)
    cache_latents: bool = True    # stage 2: encode every image and its mirror image once instead of at every step
                                  # (1.1x per step on an earlier quick preset's base-8 encoder,
                                  # docs/experiments.md; imagenet64 turns it off: ~40 GB)
    refit_codebook: int = 0       # stage 2: first replace the tokenizer's codebook by this many k-means centres of its
                                  # encoder's latents (README: how much should d say); 0 keeps it
    deterministic: bool = False   # CUDA: deterministic kernels where torch has them, so that a resumed run ends as an
                                  # uninterrupted one there too (README); CPU runs are deterministic without it


CHOICES = {"dataset": ("shapes", "cifar10", "imagenet64", "folder"), "stage": ("1", "2", "both"),
           "schedule": ("cosine", "constant"), "mode": discon.MODES, "tokenizer.in_channels": (3,)}  # data are RGB
POSITIVE = {"batch_size", "grad_accum", "tokenizer_steps", "tokenizer_lr", "model_steps", "model_lr", "log_every",
            "sample_every", "ckpt_every"}
NON_NEGATIVE = {"seed", "warmup", "weight_decay", "grad_clip"}
# A preset overrides the dataclass defaults (keys are flag names); the command line overrides the preset.
PRESETS = {
    # Shapes at 32x32 in about 12 minutes on 2 CPU cores (README's): TrainConfig's defaults, a small tokenizer (4x4
    # grid of 16 channels, 128 codes; base width 16: rFID 92 of the continuous view against 135 at width 8, and 32 is
    # no better) and a prior and a continuous model of 2 layers at width 128 each; measured choices, see
    # docs/experiments.md.
    "quick": {"tokenizer.base_channels": 16, "tokenizer.downsample": 8, "tokenizer.latent_channels": 16,
              "tokenizer.codebook_size": 128, "n_layer": 2, "n_head": 4, "n_embd": 128, "head_width": 128,
              "head_depth": 2, "diffusion_batch_mul": 1},
    # GPU recipes, not yet run end to end (docs/experiments.md has the earlier design's rates on one H200). Learning rates
    # follow MAR and LlamaGen's 1e-4 per 256 images for the transformer; the tokenizer's is of the order of LDM's
    # autoencoders. The transformers have GPT-2 small's 12 layers at width 512 instead of 768 (CIFAR-10; dropout 0.1
    # because 200k steps are ~1000 epochs) and MAR-B's (ImageNet: 24 x 768, as MAR-B's 12 encoder + 12 decoder blocks).
    # K = sampling_steps keeps MAR's ratio (64 steps for 256 tokens): 16 for the 8x8 grid, 64 for 16x16; unmeasured.
    "cifar10": {"dataset": "cifar10", "batch_size": 256, "tokenizer_steps": 50_000, "tokenizer_lr": 2e-4,
                "model_steps": 200_000, "model_lr": 1e-4, "ema_decay": 0.9999, "log_every": 100,
                "sample_every": 5000, "ckpt_every": 5000, "n_layer": 12, "n_head": 8, "n_embd": 512,
                "head_width": 1024, "head_depth": 3, "dropout": 0.1, "diffusion_steps": 100, "sampling_steps": 16},
    "imagenet64": {"dataset": "imagenet64", "batch_size": 512, "tokenizer_steps": 100_000, "tokenizer_lr": 2e-4,
                   "model_steps": 300_000, "model_lr": 2e-4, "ema_decay": 0.9999, "log_every": 100,
                   "sample_every": 10_000, "ckpt_every": 5000, "tokenizer.image_size": 64,
                   "tokenizer.base_channels": 128, "tokenizer.latent_channels": 16, "tokenizer.codebook_size": 1024,
                   "n_layer": 24, "n_head": 12, "n_embd": 768, "head_width": 1024, "head_depth": 3,
                   "diffusion_steps": 100, "sampling_steps": 64, "cache_latents": False},
}


# Help for the fields whose dataclass line has no comment; every other flag's help is its field's comment.
UNCOMMENTED = {
    "seed": "seeds the initial weights; with the step and the rank, every random draw (data order, noise, dropout)",
    "grad_accum": "micro-steps per optimizer step, for when one process's share of --batch_size does not fit",
    "tokenizer_lr": "peak learning rate of stage 1",
    "model_steps": "optimizer steps of stage 2",
    "model_lr": "peak learning rate of stage 2",
    "ema_decay": "of the EMA of the weights that previews and sample.py use (warmed up: update_ema)",
    "log_every": "steps between log lines (terminal and log.jsonl)",
    "ckpt_every": "steps between checkpoints (and the last step)",
    "num_classes": "set from the dataset by train.py; a flag only because every field is one",
    "n_head": "attention heads; n_embd must be a multiple of it",
    "n_embd": "transformer width",
    "in_channels": "image channels: 3 (RGB)",
}


def field_comments(cls):
    """{field: help} from the source of a config dataclass, so that the dataclass stays the one place where a setting is
    explained: the comment on the field's line and the comment lines aligned under it. Where a comment runs on into the
    next field's (an open bracket, or "..."), the two fields share the whole text."""
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    names, comments = [f.name for f in fields(cls)], {}
    field = row = column = None
    for tok, following in zip(tokens, tokens[1:]):
        first_on_line = not tok.line[:tok.start[1]].strip()
        if tok.type == tokenize.NAME and tok.string in names and following.string == ":" and first_on_line:
            field, row, column = tok.string, tok.start[0], None                        # a field's line
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if field and tok.start[0] == row:                                          # on the field's line
                comments[field], column = text, tok.start[1]
            elif column is not None and tok.start[1] == column:                        # aligned under it
                comments[field] += " " + text
            else:                                                                      # a comment on something else
                field = column = None
    for a, b in zip(names, names[1:]):
        text = comments.get(a, "")
        if b in comments and (text.count("(") > text.count(")") or text.endswith("...")):
            comments[a] = comments[b] = text + " " + comments[b].lstrip(". ")
    return {name: comments.get(name) or UNCOMMENTED.get(name, "") for name in names}


def make_parser(argv=None):
    """The parser of train.py, its defaults those of the preset named in argv.
    -> (parser, {flag: (config, field)}, (TrainConfig, TokenizerConfig, DisConConfig) holding those defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="quick", choices=PRESETS, help="the recipe that sets the defaults below")
    preset = pre.parse_known_args(argv)[0].preset
    train_cfg, tok_cfg, model_cfg = TrainConfig(), discon.TokenizerConfig(), discon.DisConConfig()
    flags = {f.name: (train_cfg, f) for f in fields(train_cfg)}
    assert not flags.keys() & {f.name for f in fields(model_cfg)}, "TrainConfig and DisConConfig share a field name"
    flags.update({f.name: (model_cfg, f) for f in fields(model_cfg)})
    flags.update({"tokenizer." + f.name: (tok_cfg, f) for f in fields(tok_cfg)})
    for name, value in PRESETS[preset].items():
        setattr(flags[name][0], flags[name][1].name, value)

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False, parents=[pre])
    groups = {  # one group per config in --help, in the order of the flags
        TrainConfig: parser.add_argument_group(
            "TrainConfig (train.py): data, outputs, stages, optimisation",
            "--tokenizer PATH names the stage-1 checkpoint that stage 2 builds on; the --tokenizer.NAME flags (below)\n"
            "configure the tokenizer that stage 1 trains."),
        discon.DisConConfig: parser.add_argument_group(
            "DisConConfig (discon.py): mode, transformer, diffusion head, sampling defaults"),
        discon.TokenizerConfig: parser.add_argument_group(
            "TokenizerConfig (discon.py), as --tokenizer.NAME",
            "Read by stage 1. Stage 2 rebuilds the tokenizer from the config saved in its checkpoint and ignores\n"
            "these."),
    }
    helps = {cls: field_comments(cls) for cls in groups}
    for name, (cfg, f) in flags.items():
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)  # annotations may be strings
        kind = positive(kind, zero=name in NON_NEGATIVE) if name in POSITIVE | NON_NEGATIVE else kind
        text = helps[type(cfg)][f.name].replace("%", "%%")  # argparse %-formats help strings
        groups[type(cfg)].add_argument("--" + name, dest=name, default=getattr(cfg, f.name), help=text,
                                       **{"action": argparse.BooleanOptionalAction} if kind is bool else
                                       {"type": kind, "choices": CHOICES.get(name)})
    return parser, flags, (train_cfg, tok_cfg, model_cfg)


def make_configs(argv=None):
    """Dataclass defaults <- preset <- command line. Returns (TrainConfig, TokenizerConfig, DisConConfig)."""
    parser, flags, (train_cfg, tok_cfg, model_cfg) = make_parser(argv)
    args = parse_flags(parser, argv)
    for name, (cfg, f) in flags.items():
        setattr(cfg, f.name, getattr(args, name))

    def rebuilt(config, flag_prefix):  # so that the config's own checks (__post_init__) see the final values; each
        try:                            # of their messages starts with a field's name, here turned into its flag
            return type(config)(**asdict(config))
        except ValueError as e:
            parser.error(flag_prefix + str(e))
    if not 0 <= train_cfg.beta2 < 1:  # the one TrainConfig field that POSITIVE and NON_NEGATIVE cannot bound
        parser.error(f"--beta2 must be in [0, 1), got {train_cfg.beta2}")
    return train_cfg, rebuilt(tok_cfg, "--tokenizer."), rebuilt(model_cfg, "--")


# ----------------------------------------------------------------------------------------------------------------------
# Processes: one script for CPU, one GPU and torchrun; every collective is guarded, rank 0 alone prints and writes.

def make_deterministic():
    """--deterministic: torch's deterministic kernels where it has them (on CUDA, embedding and attention backward
    otherwise add in a varying order); an op without one warns, naming itself, instead of stopping the run. cuBLAS
    reads its workspace setting when it starts, so this runs before anything touches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # one of the two settings cuBLAS documents for this
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if torch.cuda.is_available():
        # With warn_only, CUDA's flash and memory-efficient attention backwards only warn and stay non-deterministic:
        # use the math backend of scaled_dot_product_attention, deterministic and slower. (The CPU kernels already are.)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):  # torch >= 2.3
            torch.backends.cuda.enable_cudnn_sdp(False)


def setup_distributed():
    """-> (rank, local_rank, world_size, device). A plain `python` run is rank 0 of 1 and never calls a collective."""
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    world = max(world, 1)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cuDNN runs float32 convolutions in TF32 by default: the tokenizer, which encodes and decodes in float32 even
        # under autocast, would then see other numbers on a GPU than on a CPU. bf16 convolutions are not affected.
        torch.backends.cudnn.allow_tf32 = False
    if world > 1:
        # A long timeout because the one-time ImageNet-64 conversion runs while the other processes wait in a barrier.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return rank, local_rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args))  # tqdm.write keeps the progress bar intact


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on rank 0 alone; a log file (no terminal) gets one bar line a minute."""
    return tqdm(iterable, disable=int(os.environ.get("RANK", 0)) != 0, dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 60, **kwargs)


def fail(message):
    """Exit non-zero. The local rank 0 of each node prints the message, saying where when there are several processes:
    an error that only another node meets (its copy of the data missing, say) is not lost, and none prints twice."""
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if local_rank != 0:
        sys.exit(1)
    sys.exit(f"[rank {rank} of {world}, {socket.gethostname()}] {message}" if world > 1 else message)


def read_or_fail(path, read, hint):
    """read(path), or fail() in one line that names the file: a missing, truncated or foreign file is the user's."""
    try:
        return read(path)
    except Exception as e:  # unpickling, unzipping and torch.load raise anything from EOFError to RuntimeError
        fail(f"cannot read {path} ({type(e).__name__}: {e}); {hint}")


def derived_seed(*keys):
    """A seed that is a pure function of non-negative integers, e.g. (seed, stage, step, rank): randomness drawn from it
    needs no state in the checkpoint, so a resumed run repeats exactly what an uninterrupted run would have drawn."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def writable_or_fail(directory, clean=False):
    """Create `directory` and check that a file can be written into it, so that an output fails before the work and
    not after it. clean=True also removes the temporary files that atomic_write leaves when a run is killed."""
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        fail(f"cannot write into {directory}: {e.strerror or e}")
    for tmp in glob.glob(os.path.join(glob.escape(directory), "*.tmp.*")) if clean else []:
        print0(f"removing {tmp}, left by a killed run")
        os.remove(tmp)


# Config fields added after checkpoints of this design were first written, with the value that reproduces how those
# were trained.
PREDATED_FIELDS = {"tokenizer": {"decoder_noise": 0.0}}


def load_checkpoint(path, stage=None):
    """A checkpoint of train.py (of `stage`, 1 or 2, if given), or fail() in one line that names the file."""
    ckpt = read_or_fail(path, lambda p: torch.load(p, map_location="cpu"), "is it a complete checkpoint of train.py?")
    if not isinstance(ckpt, dict) or ckpt.get("stage") not in ((stage,) if stage else (1, 2)) or "config" not in ckpt:
        fail(f"{path} is not {({1: 'a tokenizer.pt', 2: 'a model.pt'}).get(stage, 'a checkpoint')} of train.py")
    for part, fields in PREDATED_FIELDS.items():  # a field the checkpoint predates: the value it was trained with
        for name, value in fields.items():
            ckpt["config"].get(part, {}).setdefault(name, value)
    return ckpt


def load_weights(module, state, path):
    """module.load_state_dict(state), or fail() in one line: a checkpoint of an earlier version of this code (before the
    tokenizer lost its GroupNorm, say) has other weights than the module this version builds from its config."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        fail(f"{path} does not fit the model this version of the code builds ({first}); it was probably written by "
             f"an earlier version: train it again")


def load_optimizer(optimizer, state):
    """optimizer.load_state_dict(state), with each moment copied into its parameter's memory layout: a checkpoint
    written in another layout (stage 1 runs channels_last on a CPU) would otherwise break fused AdamW on a GPU."""
    optimizer.load_state_dict(state)
    for param, moments in optimizer.state.items():
        for name, value in moments.items():
            if name != "step" and torch.is_tensor(value) and value.shape == param.shape:
                moments[name] = torch.empty_like(param).copy_(value)


def load_tokenizer(path):
    """The finished stage-1 checkpoint that stage 2 builds on."""
    if not os.path.exists(path):
        fail(f"no tokenizer checkpoint at {path}: run stage 1 first or pass --tokenizer PATH")
    ckpt = load_checkpoint(path, stage=1)
    return ckpt if ckpt["finished"] else fail(f"{path} is unfinished: finish stage 1 with --stage 1 --resume")


def tokenizer_path(tokenizer, out_dir):
    """The stage-1 checkpoint that stage 2 builds on: --tokenizer, else tokenizer.pt in --out_dir."""
    return tokenizer or os.path.join(out_dir, "tokenizer.pt")


def check_same_tokenizer(model, ckpt, path, train_cfg):
    """Stop a resumed stage 2 whose tokenizer (as main() built it) has other weights than the one in its checkpoint
    `path`: the configs may match while tokenizer.pt was retrained, or another --tokenizer was passed. Resuming would
    silently go on with the old tokenizer, stored in the checkpoint."""
    saved = {k.removeprefix("tokenizer."): v for k, v in ckpt["model"].items() if k.startswith("tokenizer.")}
    now = model.tokenizer.state_dict()
    if now.keys() != saved.keys() or not all(torch.equal(now[k].cpu(), saved[k]) for k in saved):
        tok_path = tokenizer_path(train_cfg.tokenizer, train_cfg.out_dir)
        trained_on = tokenizer_path(ckpt["config"]["train"]["tokenizer"], ckpt["config"]["train"]["out_dir"])
        fail(f"{path} was trained on other tokenizer weights than {tok_path} holds now (retrained, or another "
             f"--tokenizer): resume with the tokenizer it was trained on (its config names {trained_on}), or leave out "
             f"--resume to train stage 2 anew on {tok_path}")


def trim_log(path, stage, step):
    """Drop the lines of log.jsonl after (stage, step), where this run starts: a resumed run logs the steps after its
    checkpoint again. A torn last line, written when the run was killed, goes too."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("}\n")]
        lines = [line for line in lines if (json.loads(line)["stage"], json.loads(line)["step"]) <= (stage, step)]
        atomic_write(path, lambda f: f.write("".join(lines).encode()))


def save_grid(images, ncol, path):
    """images: uint8 (N, H, W, 3) -> one PNG with ncol images per row and 2-pixel white gaps."""
    n, h, w, _ = images.shape
    nrow, pad = -(-n // ncol), 2
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------------
# Data: every dataset becomes (images uint8 (N, H, W, 3), labels int64 (N,), num_classes), held in memory or mem-mapped.

SHAPES = {  # class name -> inside-test in shape coordinates (u, v): centre 0, radius 1, v grows downwards
    "circle": lambda u, v: u * u + v * v < 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,
    "triangle": lambda u, v: (v < 0.7) & (abs(u) < 0.6 * (v + 0.9)),
    "cross": lambda u, v: ((abs(u - v) < 0.35) | (abs(u + v) < 0.35)) & (np.maximum(abs(u), abs(v)) < 0.85),
    "ring": lambda u, v: (u * u + v * v < 1) & (u * u + v * v > 0.4),
    "diamond": lambda u, v: abs(u) + abs(v) < 1,
    "horizontal bar": lambda u, v: (abs(u) < 1) & (abs(v) < 0.35),
    "vertical bar": lambda u, v: (abs(u) < 0.35) & (abs(v) < 1),
    "plus": lambda u, v: ((abs(u) < 0.3) | (abs(v) < 0.3)) & (np.maximum(abs(u), abs(v)) < 1),
    "half-disc": lambda u, v: (u * u + (v + 0.4) ** 2 < 1) & (v > -0.4),
}
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"


def make_shapes(n, size, seed):
    """The built-in dataset, a pure function of (n, size, seed): class k is the k-th of SHAPES at a random size,
    place and colour on a two-colour gradient. The foreground is light on a dark background or the reverse, so every
    shape stands out; masks are evaluated on a 4x finer grid and averaged down, which antialiases the edges."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    radius = rng.uniform(0.2, 0.4, n).astype(np.float32)                    # fraction of the image side
    cx, cy = (rng.uniform(radius, 1 - radius).astype(np.float32) for _ in range(2))
    fg = rng.uniform(0, 1, (n, 3))
    light = fg.mean(1, keepdims=True) > 0.5
    bg0 = np.where(light, rng.uniform(0, 0.35, (n, 3)), rng.uniform(0.65, 1, (n, 3)))
    bg1 = np.clip(bg0 + rng.uniform(-0.2, 0.2, (n, 3)), 0, 1)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))                            # direction of the gradient
    fine = ((np.arange(4 * size) + 0.5) / (4 * size)).astype(np.float32)    # pixel centres of the 4x grid in [0, 1]
    offset = (np.arange(size) + 0.5) / size - 0.5                           # pixel centres, from the image centre
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, 256):  # in chunks, so that the 4x masks stay in cache
        i = slice(start, start + 256)
        u = (fine[None, None, :] - cx[i, None, None]) / radius[i, None, None]  # (b, 1, 4s)
        v = (fine[None, :, None] - cy[i, None, None]) / radius[i, None, None]  # (b, 4s, 1)
        mask = np.zeros((len(u), 4 * size, 4 * size), np.float32)
        for k, inside in enumerate(SHAPES.values()):
            mask[labels[i] == k] = inside(u[labels[i] == k], v[labels[i] == k])
        alpha = mask.reshape(-1, size, 4, size, 4).mean((2, 4))[..., None]     # (b, s, s, 1) coverage
        t = 0.5 + offset[None, None, :] * np.cos(angle[i]) + offset[None, :, None] * np.sin(angle[i])
        t = np.clip(t, 0, 1)[..., None]                                        # (b, s, s, 1) position on the gradient
        background = bg0[i, None, None] * (1 - t) + bg1[i, None, None] * t
        images[i] = (background * (1 - alpha) + fg[i, None, None] * alpha) * 255 + 0.5
    return images, labels


# The shapes judge: since shapes are drawn by code, we know what each sample should show. A small CNN trained on shapes
# of a seed the training set never uses (it uses 0) tells the ten classes apart; the class accuracy of class-conditional
# samples (the fraction it assigns to the class they were sampled for) measures whether a model learnt the shapes,
# which FID at a few thousand samples hardly does. About 10 s on 2 CPU cores, then cached.
JUDGE_SEED = 1


def make_judge():
    w = 16
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(4 * w, len(SHAPES)))


def gaussian_blur(x, sigma, radius=2):
    """Blur images (B, 3, H, W) with a (2 radius + 1)^2 Gaussian kernel, replicating the border."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    size = 2 * radius + 1
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel.expand(3, 1, size, size), groups=3)


def shape_judge(image_size, cache_dir=None, steps=400, batch=128, lr=3e-3):
    """The judge for shapes of this size: loaded from cache_dir/shape_judge_{size}.pt, or trained (and cached there)."""
    path = cache_dir and os.path.join(cache_dir, f"shape_judge_{image_size}.pt")
    with torch.random.fork_rng():  # seeded, without moving the caller's random state
        torch.manual_seed(JUDGE_SEED)
        judge = make_judge()
    if path and os.path.exists(path):
        judge.load_state_dict(torch.load(path, map_location="cpu"))
        return judge.eval()
    images, labels = make_shapes(10_000, image_size, seed=JUDGE_SEED)
    x, y = to_model_input(images, "cpu", image_size), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(JUDGE_SEED)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        i = torch.randint(0, len(x), (batch,), generator=generator)
        # Generated images are a little blurred by the tokenizer's decoder: mixing each image with a blurred copy
        # keeps such images recognisable to the judge (98.4% -> 99.2% on the quick tokenizer's reconstructions).
        mix = torch.rand(batch, 1, 1, 1, generator=generator)
        xi = (1 - mix) * x[i] + mix * gaussian_blur(x[i], sigma=1.5)
        with torch.enable_grad():  # callers may run under no_grad
            loss = F.cross_entropy(judge(xi), y[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if path:
        atomic_write(path, lambda f: torch.save(judge.state_dict(), f))
    return judge.eval()


@torch.no_grad()
def class_accuracy(judge, images, labels):
    """uint8 images (N, H, W, 3) sampled for labels (N,) -> (overall accuracy, {class name: accuracy})."""
    x = to_model_input(images, "cpu", images.shape[1])
    predicted = torch.cat([judge(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()
    labels = np.asarray(labels)
    correct = predicted == labels
    per_class = {name: float(correct[labels == k].mean()) for k, name in enumerate(SHAPES) if (labels == k).any()}
    return float(correct.mean()), per_class


def prepare_data(name, data_dir, image_size):
    """One-time work, run by one process per node while the others wait: download CIFAR-10, or convert ImageNet-64 or
    an image folder into one uint8 .npy that every process memory-maps (a node's processes share one copy in RAM)."""
    if name == "cifar10" and not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        try:
            with urllib.request.urlopen(CIFAR_URL, timeout=60) as response:
                archive = response.read()  # 170 MB, extracted from memory
        except OSError as e:
            fail(f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py and downloading it failed ({e}).\n"
                 f"Download {CIFAR_URL} and extract it into {data_dir}/ (giving {data_dir}/cifar-10-batches-py/).")
        if hashlib.md5(archive).hexdigest() != CIFAR_MD5:
            fail(f"the download of {CIFAR_URL} does not have the MD5 {CIFAR_MD5} of the official archive; retry")
        writable_or_fail(data_dir)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # tar filters: Python 3.12+, some 3.8-3.11 patches
            tar.extractall(data_dir, **{"filter": "data"} if hasattr(tarfile, "data_filter") else {})
    if name not in ("imagenet64", "folder"):
        return
    images_path, labels_path, files, _ = converted_paths(name, data_dir, image_size)
    if os.path.exists(images_path):  # written last: its presence means that the conversion is complete
        return
    if not files:  # (a folder without images fails in converted_paths)
        fail(f"no ImageNet 64x64 files in {data_dir}: put the official downsampled ImageNet training files there "
             f"(Imagenet64_train_part*.zip from image-net.org, unzipped: train_data_batch_1.npz .. 10.npz)")
    writable_or_fail(data_dir)
    if name == "imagenet64":  # the official batches: ~15 GB of zipped (n, 12288) flattened CHW arrays
        def read(path, key):
            return read_or_fail(path, lambda p: np.load(p)[key], "a truncated copy? Unzip the official files again")
        labels = np.concatenate([read(p, "labels") for p in files]).astype(np.int64) - 1  # they count from 1
        size, images = 64, (read(p, "data").reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1) for p in files)
    else:  # centre crop to a square, then resize; unreadable images are reported and skipped
        size, images, labels = image_size, [], []
        for path, k in files:
            try:
                image = Image.fromarray(read_rgb(path))
            except ValueError as e:
                print0(f"skipping {e}")
                continue
            images.append(np.asarray(ImageOps.fit(image, (image_size,) * 2, Image.Resampling.BICUBIC)))
            labels.append(k)
        if not images:
            fail(f"no readable images in the class sub-directories of {data_dir}")
        labels = np.asarray(labels, np.int64)
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(labels), size, size, 3)}

    def write_images(f):  # the .npy header, then the images: ImageNet-64 one batch at a time, never all in memory
        np.lib.format.write_array_header_1_0(f, header)
        for part in images:
            f.write(part.tobytes())
    atomic_write(labels_path, lambda f: np.save(f, labels))
    atomic_write(images_path, write_images)


def converted_paths(name, data_dir, image_size):
    """-> (images .npy, labels .npy, source files, number of classes) of ImageNet-64 or of a folder with one
    sub-directory of images per class (hidden entries, .ipynb_checkpoints or ._x.png, are neither). A folder's .npy
    are named after a hash of its file list: adding, removing or changing an image converts the folder anew."""
    if name == "imagenet64":
        files = sorted(glob.glob(os.path.join(data_dir, "train_data_batch_*.npz")),
                       key=lambda p: int(p[:-4].split("_")[-1]))  # batch 10 after batch 9, not after batch 1
        base = os.path.join(data_dir, "imagenet64_train_")
        return base + "images.npy", base + "labels.npy", files, 1000
    if not os.path.isdir(data_dir):
        fail(f"--data_dir {data_dir} is not a directory (the folder dataset wants one sub-directory per class)")
    classes = sorted(d for d in os.listdir(data_dir) if d[0] != "." and os.path.isdir(os.path.join(data_dir, d)))
    files = [(f, k) for k, c in enumerate(classes) for f in image_files(os.path.join(data_dir, c))]
    if not files:
        fail(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in the class sub-directories of {data_dir}")
    key = hashlib.sha1(repr([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f, _ in files]).encode()).hexdigest()
    base = os.path.join(data_dir, f".discon_{image_size}px_{key[:12]}_")
    return base + "images.npy", base + "labels.npy", files, len(classes)


def load_dataset(name, data_dir, image_size):
    """-> (images uint8 (N, H, W, 3), labels int64 (N,), num_classes). Call prepare_data first (it converts a folder
    here if not)."""
    if name == "shapes":
        return (*make_shapes(20_000, image_size, seed=0), len(SHAPES))
    if name == "cifar10":
        def read(path):  # (n, 3072) flattened CHW -> (n, 32, 32, 3)
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[b"labels"], np.int64)
        folder = os.path.join(data_dir, "cifar-10-batches-py")
        batches = [read_or_fail(os.path.join(folder, f"data_batch_{i}"), read, f"delete {folder} to download it again")
                   for i in range(1, 6)]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), 10
    images_path, labels_path, _, num_classes = converted_paths(name, data_dir, image_size)
    if name == "folder" and not os.path.exists(images_path):
        prepare_data(name, data_dir, image_size)
    return np.load(images_path, mmap_mode="r"), np.load(labels_path), num_classes


def balanced_subset(labels, n, seed=0):
    """Sorted indices of n images, as many of each class as the data allow, drawn with a seeded shuffle: "the first n
    images" of a dataset sorted by class (a folder, ImageNet) would be one class."""
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # classes in turn, each shuffled
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])  # of each image within its class
    return np.sort(order[np.argsort(rank, kind="stable")[:n]])  # the first of every class, then the second, ...


def to_device(array, device):
    """numpy -> torch on the device; on CUDA from pinned memory and without waiting for the copy (no host sync)."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    return x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)


def to_model_input(images, device, image_size):
    """uint8 (B, H, W, 3) -> float (B, 3, image_size, image_size) in [-1, 1] on the device."""
    x = to_device(images, device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != image_size:  # e.g. ImageNet-64 trained at 32x32
        x = F.interpolate(x, size=image_size, mode="bicubic", antialias=True).clamp(-1, 1)
    return x


def model_inputs(images, index, device, image_size, batch=250):
    """to_model_input of images[index], `batch` images at a time: the whole subset need not be in memory at once."""
    return (to_model_input(images[index[i:i + batch]], device, image_size) for i in range(0, len(index), batch))


@functools.lru_cache(maxsize=1)
def permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(data, position, train_cfg, rank, world, device, image_size, latents=None):
    """The global batch at data position (epoch, index) of the epoch's permutation, a pure function of (seed, epoch);
    this process takes its slice. Flips are drawn for the whole global batch before slicing, so the data a step sees
    do not depend on the number of processes. -> (x, y, next position); x is images, or with the latents of
    encode_dataset a (c, d) pair."""
    images, labels, _ = data
    epoch, index = position
    if index + train_cfg.batch_size > len(labels):  # drop the last partial batch of an epoch
        epoch, index = epoch + 1, 0
    order = permutation(train_cfg.seed, epoch, len(labels))[index:index + train_cfg.batch_size]
    flip = np.random.default_rng([train_cfg.seed, epoch, index]).random(train_cfg.batch_size) < 0.5
    share = train_cfg.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    if latents is not None:
        i, f = to_device(order[mine], device), to_device(flip[mine].astype(np.int64), device)
        x = (latents[0][f, i], latents[1][f, i])
    else:
        x = to_model_input(images[order[mine]], device, image_size)
        x = torch.where(to_device(flip[mine], device)[:, None, None, None], x.flip(3), x)
    return x, to_device(labels[order[mine]], device), (epoch, index + train_cfg.batch_size)


@torch.no_grad()
def encode_dataset(tokenizer, images, device, image_size, batch=250):
    """(c, d) of every image, [0], and of its mirror image, [1]: stage 2's inputs, encoded once for all steps.
    -> c (2, N, C, h, w) and d (2, N, h, w) on the device."""
    parts = []  # per batch: (c, d) of the images, of their mirror images
    for i in progress(range(0, len(images), batch), desc="encoding the dataset"):
        x = to_model_input(images[i:i + batch], device, image_size)
        parts.append((tokenizer.encode(x), tokenizer.encode(x.flip(3))))
    return tuple(torch.stack([torch.cat([p[flip][k] for p in parts]) for flip in (0, 1)]) for k in (0, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Training

def make_optimizer(model, lr, train_cfg, device):
    """AdamW that decays only the weight matrices of Linear and Conv layers: norms, biases and embeddings (the codebook
    too) keep their scale, as minGPT groups them (nanoGPT decays embeddings too; decay would pull the codebook towards
    zero, away from the encoder outputs it must match). The frozen tokenizer of stage 2 is left out."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                matrix = isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and p.dim() >= 2
                (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, train_cfg.beta2), fused=device.type == "cuda")


def lr_at(step, steps, lr, train_cfg):
    """Linear warmup, then cosine down to lr/10 (nanoGPT) or constant (MAR)."""
    warmup = int(train_cfg.warmup * steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, model, step, decay):
    # The decay warms up as in TensorFlow's ExponentialMovingAverage(num_updates): early on the average spans only the
    # last few steps, so a short run still gets a useful EMA instead of one that remembers the random initialisation.
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:  # not the frozen tokenizer of stage 2
            e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def save_preview(stage, ema, data, step, train_cfg, device, image_size):
    """Stage 1: rows original | continuous reconstruction | discrete reconstruction. Stage 2: one row of samples per
    class (10 classes at most, spread over the label range), from the EMA weights."""
    if stage == 1:
        x = to_model_input(data[0][balanced_subset(data[1], 8)], device, image_size)
        c, d = ema.encode(x)
        images = discon.to_uint8(torch.cat([x, ema.decode(c), ema.decode_codes(d)]))
    else:
        classes = torch.linspace(0, data[2] - 1, min(data[2], 10)).round().long()
        y = classes.repeat_interleave(8).to(device)
        generator = torch.Generator(device).manual_seed(train_cfg.seed)
        images = ema.generate(y, generator=generator)  # at the sampling defaults of the model config
    name = f"{'reconstructions' if stage == 1 else 'samples'}_{step:07d}.png"
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    save_grid(images, 8, os.path.join(train_cfg.out_dir, name))
    if stage == 2 and train_cfg.dataset == "shapes":
        accuracy, _ = class_accuracy(shape_judge(image_size, train_cfg.out_dir), images, y.cpu().numpy())
        print0(f"{name}: class accuracy {100 * accuracy:.0f}% of its {len(y)} samples (the shapes judge)")


def train_stage(stage, model, data, train_cfg, config, rank, world, device):
    """Stage 1 trains the Tokenizer and then fits its latent statistics; stage 2 trains DisCon on the frozen tokenizer.
    Writes out_dir/tokenizer.pt or out_dir/model.pt; with --resume it continues from that file."""
    name = "tokenizer" if stage == 1 else "model"
    steps, lr = getattr(train_cfg, name + "_steps"), getattr(train_cfg, name + "_lr")
    path = os.path.join(train_cfg.out_dir, name + ".pt")
    image_size = config["tokenizer"]["image_size"]
    model.to(device)
    # On the AMD EPYC of docs/experiments.md a stage-1 step (forward, backward, AdamW) ran 1.26x faster with the
    # weights and images in channels_last (NHWC) memory. Unmeasured on GPUs, where stage 1 keeps the default layout.
    # Checkpoints load into either layout (load_state_dict copies; load_optimizer below for the moments).
    channels_last = stage == 1 and device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, lr, train_cfg, device)
    step, position = 0, (0, 0)
    if train_cfg.resume and os.path.exists(path):
        ckpt = load_checkpoint(path, stage)
        for part in ("tokenizer", "model")[:stage]:
            saved = ckpt["config"][part]
            diff = {k: (saved.get(k), v) for k, v in config[part].items()
                    if saved.get(k) != v and k not in discon.SAMPLING_FIELDS}
            if diff:
                fail(f"{path} was made with another {part} config, field: (checkpoint, now): {diff}")
        if stage == 2:
            check_same_tokenizer(model, ckpt, path, train_cfg)
        if ckpt["step"] > steps:
            fail(f"{path} is at step {ckpt['step']}, beyond --{name}_steps {steps}: pass --{name}_steps {ckpt['step']} "
                 f"or more to continue it, or leave out --resume to start again")
        if ckpt["finished"] and ckpt["step"] == steps:
            print0(f"stage {stage} already finished in {path}")
            return
        load_weights(model, ckpt["model"], path)
        load_weights(ema, ckpt["ema"], path)
        load_optimizer(optimizer, ckpt["optimizer"])
        step, position = ckpt["step"], (ckpt["data"]["epoch"], ckpt["data"]["index"])
        print0(f"stage {stage}: resuming from {path} at step {step}")
    if rank == 0:
        trim_log(os.path.join(train_cfg.out_dir, "log.jsonl"), stage, step)
    # Stage 2 compiles in pieces: each random draw from `generator` breaks the graph (9 breaks in one forward, torch
    # 2.13). Stage 1 would break at the dead-code restart and at its collectives, and torch 2.13's compiled backward
    # of its VQ loss fails, so it stays eager.
    net = torch.compile(model) if train_cfg.compile and stage == 2 else model
    if world > 1:
        # Stage 2's buffers (the frozen tokenizer's, the diffusion tables) are equal on every process: no broadcast.
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=stage == 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    generator = torch.Generator(device)
    micro = train_cfg.batch_size // (world * train_cfg.grad_accum)
    bar = progress(total=steps, initial=step, desc=f"stage {stage}")
    latents = None
    if stage == 2 and train_cfg.cache_latents:
        latents = encode_dataset(model.tokenizer, data[0], device, image_size)
    logged, logged_steps, t0 = 0, 0, time.time()
    model.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, train_cfg)
        x, y, position = get_batch(data, position, train_cfg, rank, world, device, image_size, latents)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Model noise (diffusion, KL sampling, label drop) comes from `generator`, dropout from the global RNG; both
        # are re-seeded from (seed, stage, step, rank) each step, which is what makes --resume exact on every process.
        generator.manual_seed(derived_seed(train_cfg.seed, stage, step, rank, 0))
        torch.manual_seed(derived_seed(train_cfg.seed, stage, step, rank, 1))
        micro_x = list(zip(*(t.split(micro) for t in x))) if isinstance(x, tuple) else x.split(micro)
        for i, (xi, yi) in enumerate(zip(micro_x, y.split(micro))):
            # Under DDP gradients are averaged over processes on the last micro-step only (no_sync before it); dividing
            # by the accumulation count makes the summed gradient that of the mean loss over the global batch.
            with net.no_sync() if world > 1 and i < train_cfg.grad_accum - 1 else nullcontext():
                with autocast:
                    terms = net(xi, generator=generator) if stage == 1 else net(xi, yi, generator=generator)
                (terms["loss"] / train_cfg.grad_accum).backward()
            logged = logged + torch.stack([v.detach().float() for v in terms.values()]) / train_cfg.grad_accum
        # Stage 2 clips the prior's and the continuous model's gradients each on its own, so that neither's norm
        # scales the other's step: the prior of a `discon` model trains as the `discrete` model of its seed (bit for
        # bit on a CPU; bf16 and the order of NCCL's sums leave them close on GPUs). The log's grad_norm is the larger.
        grad_norm = torch.stack([nn.utils.clip_grad_norm_(part.parameters(), train_cfg.grad_clip or float("inf"))
                                 for part in (model.parts() if stage == 2 else [model])]).max()
        # A non-finite loss gives a non-finite gradient norm (the same on every process) and non-finite weights from
        # then on. Reading the norm makes the host wait for the device, so it is read only at the steps that wait anyway
        # (log, checkpoint, preview): all processes stop together, before a bad checkpoint.
        log, save, preview = (step + 1 == steps or (step + 1) % k == 0
                              for k in (train_cfg.log_every, train_cfg.ckpt_every, train_cfg.sample_every))
        if (log or save or preview) and not torch.isfinite(grad_norm):
            fail(f"stage {stage}: the loss or its gradient is not finite at step {step}; stopping. The last good "
                 f"checkpoint ({path}) is intact: resume from it with a lower learning rate or --grad_clip.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, step, train_cfg.ema_decay)
        step, logged_steps = step + 1, logged_steps + 1
        bar.update()
        if log:
            if world > 1:
                dist.all_reduce(logged)
            means = (logged / (world * logged_steps)).tolist()
            line = {"stage": stage, "step": step, **{k: round(v, 5) for k, v in zip(terms, means)},
                    "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm.item(), 4),
                    "images_per_s": round(logged_steps * train_cfg.batch_size / (time.time() - t0), 1)}
            bar.set_postfix(loss=f"{line['loss']:.4f}")
            print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
            if rank == 0:
                with open(os.path.join(train_cfg.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
            logged, logged_steps, t0 = 0, 0, time.time()
        if rank == 0 and save:
            if stage == 1 and step == steps:  # per-channel latent statistics of the final (EMA) tokenizer
                ema.fit_latent_stats(model_inputs(data[0], balanced_subset(data[1], 10_000), device, image_size))
            checkpoint = {"stage": stage, "step": step, "finished": step == steps,
                          "data": {"epoch": position[0], "index": position[1]}, "config": config,
                          "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        if rank == 0 and preview:
            save_preview(stage, ema, data, step, train_cfg, device, image_size)
    bar.close()
    barrier()  # stage 2 reads the tokenizer checkpoint that rank 0 has just written


def main(argv=None):
    train_cfg, tok_cfg, model_cfg = make_configs(argv)
    if train_cfg.deterministic:
        make_deterministic()
    rank, local_rank, world, device = setup_distributed()
    try:
        if train_cfg.batch_size % (world * train_cfg.grad_accum):
            fail(f"--batch_size {train_cfg.batch_size} is not divisible by processes x --grad_accum = "
                 f"{world * train_cfg.grad_accum}")
        if train_cfg.tokenizer and train_cfg.stage != "2":
            fail("--tokenizer starts stage 2 from an existing tokenizer: use it with --stage 2")
        tok_path = tokenizer_path(train_cfg.tokenizer, train_cfg.out_dir)
        if train_cfg.stage == "2":  # the tokenizer checkpoint defines the tokenizer config (and so the image size)
            tok_cfg = discon.TokenizerConfig(**load_tokenizer(tok_path)["config"]["tokenizer"])
        if rank == 0:
            writable_or_fail(train_cfg.out_dir, clean=True)
        if local_rank == 0:
            prepare_data(train_cfg.dataset, train_cfg.data_dir, tok_cfg.image_size)
        barrier()
        data = load_dataset(train_cfg.dataset, train_cfg.data_dir, tok_cfg.image_size)
        if len(data[1]) < train_cfg.batch_size:
            fail(f"--batch_size {train_cfg.batch_size} is more than the {len(data[1])} images of the dataset")
        if data[1].min() < 0 or data[1].max() >= data[2]:  # checked once here, not in every step on the device
            fail(f"the labels of {train_cfg.data_dir} are not all in [0, {data[2]})")
        model_cfg.num_classes = data[2]
        print0(f"{train_cfg.dataset}: {len(data[1])} images, {data[2]} classes; {world} process(es) on {device}")
        config = {"train": asdict(train_cfg), "tokenizer": asdict(tok_cfg), "model": asdict(model_cfg)}
        if train_cfg.stage in ("1", "both"):
            torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
            train_stage(1, discon.Tokenizer(tok_cfg), data, train_cfg, config, rank, world, device)
        if train_cfg.stage in ("2", "both"):
            tokenizer = discon.Tokenizer(tok_cfg)
            load_weights(tokenizer, load_tokenizer(tok_path)["ema"], tok_path)
            if train_cfg.refit_codebook:
                subset = balanced_subset(data[1], 5000, train_cfg.seed)
                generator = torch.Generator().manual_seed(train_cfg.seed)
                tokenizer.refit_codebook(model_inputs(data[0], subset, "cpu", tok_cfg.image_size),
                                         train_cfg.refit_codebook, generator=generator)
                config["tokenizer"] = asdict(tokenizer.cfg)
            torch.manual_seed(train_cfg.seed)
            try:
                model = discon.DisCon(model_cfg, tokenizer)
            except ValueError as e:  # a field that only the tokenizer's grid bounds (sampling_steps)
                fail(f"--{e}")
            train_stage(2, model, data, train_cfg, config, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
