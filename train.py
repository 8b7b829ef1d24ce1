"""
Train DisCon in two stages (README.md):
  stage 1: the tokenizer (the continuous grid c and its quantized view d), then its per-channel latent statistics;
  stage 2: on the frozen tokenizer, the discrete prior p(d | y) and the continuous model p(c | d, y), side by side.
The same script runs on a CPU, one GPU, or under torchrun (DDP, chosen from RANK / LOCAL_RANK / WORLD_SIZE):
  python train.py                                            # quick preset: built-in shapes, both stages, CPU
  python train.py --preset cifar10 --out_dir runs/cifar10     # one GPU
  torchrun --nproc_per_node 8 train.py --preset imagenet64 --out_dir runs/in64
  python train.py --stage 2 --tokenizer out/tokenizer.pt --mode continuous --out_dir out_continuous
  (any of these) --resume                                     # continue from the checkpoints in --out_dir
Every config field is a flag spelt as the field: --n_layer 6, --tokenizer.latent_channels 8. What each one does is
the comment beside the field: TrainConfig below, TokenizerConfig and DisConConfig in discon.py.
"""
import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import discon
from data import fail, print0


@dataclass
class TrainConfig:
    dataset: str = "shapes"       # shapes (built in) | cifar10 | imagenet64 | folder (one sub-directory per class)
    data_dir: str = "data"        # the cifar10 / imagenet64 files (downloaded / converted there), or the folder
    out_dir: str = "out"          # checkpoints (tokenizer.pt, model.pt), log.jsonl, PNG previews
    stage: str = "both"           # 1 (the tokenizer) | 2 (the prior and the continuous model) | both
    tokenizer: str = ""           # stage 2 builds on this stage-1 checkpoint (empty: out_dir/tokenizer.pt)
    resume: bool = False          # continue each stage from its checkpoint in out_dir
    seed: int = 0                 # the initial weights; with (stage, step, rank), every random draw
    batch_size: int = 32          # global: per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1           # micro-steps per optimizer step, for when one process's share does not fit
    tokenizer_steps: int = 1500   # stage 1's optimizer steps (the quick preset: about 8 min for both stages on 2 cores)
    tokenizer_base_lr: float = 2.4e-2  # per 256 images: the rate is this * batch_size / 256 (MAR's blr); 3e-3 at 32
    model_steps: int = 7000       # stage 2's
    model_base_lr: float = 2.4e-2
    warmup: float = 0.05          # fraction of a stage's steps with a linear warmup
    schedule: str = "cosine"      # cosine (down to lr / 10, as nanoGPT) | constant (as MAR)
    weight_decay: float = 0.02    # MAR's
    beta2: float = 0.95           # AdamW betas (0.9, 0.95): MAR's and LlamaGen's
    grad_clip: float = 1.0        # LlamaGen's; 0 = off
    ema_decay: float = 0.999      # of the weights that the previews and sample.py use
    log_every: int = 50           # steps between lines of the log (terminal and log.jsonl)
    sample_every: int = 1000      # steps between PNG previews: reconstructions (stage 1) or samples (stage 2)
    ckpt_every: int = 500         # steps between checkpoints (and the last step)
    compile: bool = False         # torch.compile the stage-2 models (stage 1 stays eager: docs/gpu.md)
    cache_latents: bool = True    # stage 2: encode each image and its mirror image once, not at every step
    deterministic: bool = False   # CUDA's deterministic kernels, so that --resume is exact there too (docs/gpu.md)

    def __post_init__(self):
        discon.check_fields(self, positive=("batch_size", "grad_accum", "tokenizer_steps", "tokenizer_base_lr",
                                            "model_steps", "model_base_lr", "log_every", "sample_every", "ckpt_every"),
                            non_negative=("seed", "warmup", "weight_decay", "grad_clip"))
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        if self.ckpt_every % self.log_every:  # else the first line after a resume would average fewer steps
            raise ValueError(f"ckpt_every must be a multiple of log_every, got {self.ckpt_every} and {self.log_every}")


# Each preset's data and optimisation; discon.PRESETS holds its tokenizer and models. The transformers' base rate is
# MAR's 1e-4 per 256 images (LlamaGen's 1e-4 too); the tokenizer's of the order of LDM's autoencoders.
PRESETS = {
    "quick": {},
    "cifar10": dict(dataset="cifar10", batch_size=256, tokenizer_steps=50_000, tokenizer_base_lr=2e-4,
                    model_steps=200_000, model_base_lr=1e-4, ema_decay=0.9999, log_every=100, sample_every=5000,
                    ckpt_every=5000),
    "imagenet64": dict(dataset="imagenet64", batch_size=512, tokenizer_steps=100_000, tokenizer_base_lr=1e-4,
                       model_steps=300_000, model_base_lr=1e-4, ema_decay=0.9999, log_every=100, sample_every=10_000,
                       ckpt_every=5000, cache_latents=False),  # the cache would take ~40 GB
}
CHOICES = {"dataset": ("shapes", "cifar10", "imagenet64", "folder"), "stage": ("1", "2", "both"),
           "schedule": ("cosine", "constant"), "mode": discon.MODES, "tokenizer.in_channels": (3,)}
# DisConConfig fields that only sampling reads: a resumed run may change them. TrainConfig fields that set what each
# step does: a resumed run must keep them (and its stage's learning rate), or it fails in one line.
SAMPLING_FIELDS = ("discrete_guidance", "discrete_temperature", "continuous_guidance", "continuous_temperature",
                   "sampling_steps", "diffusion_steps", "clip_latent")
RESUME_FIXED = ("dataset", "seed", "batch_size", "grad_accum", "warmup", "schedule", "weight_decay", "beta2",
                "grad_clip", "ema_decay")


def make_configs(argv=None):
    """The dataclass defaults <- the preset <- the command line -> (TrainConfig, TokenizerConfig, DisConConfig)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="quick", choices=PRESETS, help="the recipe that sets the defaults below")
    preset = pre.parse_known_args(argv)[0].preset
    tokenizer_fields, model_fields = discon.PRESETS[preset]
    defaults = [(TrainConfig(**PRESETS[preset]), ""), (discon.DisConConfig(**model_fields), ""),
                (discon.TokenizerConfig(**tokenizer_fields), "tokenizer.")]
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, parents=[pre], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for config, prefix in defaults:
        group = parser.add_argument_group(type(config).__name__, "the preset's defaults")
        for f in fields(config):
            value, name = getattr(config, f.name), prefix + f.name
            kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
            group.add_argument("--" + name, dest=name, default=value, help=f"default {value}",
                               choices=CHOICES.get(name), **kind)
    args = parser.parse_args(argv)
    configs = []
    for config, prefix in defaults:
        try:  # the configs' own checks; each message starts with the field's name, here made its flag
            configs.append(type(config)(**{f.name: getattr(args, prefix + f.name) for f in fields(config)}))
        except ValueError as e:
            parser.error(f"--{prefix}{e}")
    return configs[0], configs[2], configs[1]


def make_deterministic():
    """--deterministic: torch's deterministic kernels where it has them (an op without one warns, naming itself), and
    the math attention backend (CUDA's flash and memory-efficient backwards are not deterministic). cuBLAS reads its
    workspace setting when it starts, so this runs before anything touches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # one of the two settings cuBLAS documents for this
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if torch.cuda.is_available():
        for kernel in ("flash", "mem_efficient", "cudnn"):  # torch >= 2.3 has cuDNN's
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp", lambda enabled: None)(False)


def make_optimizer(model, lr, train_cfg, device):
    """AdamW that decays only the weight matrices of Linear and Conv layers; norms, biases and embeddings (the codebook
    too) keep their scale, as minGPT groups them. The frozen tokenizer of stage 2 is left out."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (decay if isinstance(module, (nn.Linear, nn.Conv2d)) and p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, train_cfg.beta2), fused=device.type == "cuda")


def lr_at(step, steps, lr, train_cfg):
    """Linear warmup, then cosine down to lr / 10 (nanoGPT) or constant (MAR)."""
    warmup = int(train_cfg.warmup * steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return lr
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """EMA of the trained weights. The decay warms up as TensorFlow's ExponentialMovingAverage(num_updates) does, so a
    short run gets an EMA of its last steps, not one that remembers the initialisation."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:  # not the frozen tokenizer of stage 2
            e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def save_preview(stage, ema, dataset, step, train_cfg, device, image_size, autocast):
    """Stage 1: rows of originals, continuous and discrete reconstructions. Stage 2: a row of samples per class (10
    classes at most, spread over the labels) at the config's sampling settings, with the judge's verdict on shapes."""
    if stage == 1:
        x = data.to_model_input(dataset[0][data.balanced_subset(dataset[1], 8)], device, image_size)
        c, d = ema.encode(x)
        images = discon.to_uint8(torch.cat([x, ema.decode(c), ema.decode_codes(d)]))
    else:
        y = torch.linspace(0, dataset[2] - 1, min(dataset[2], 10)).round().long().repeat_interleave(8).to(device)
        with autocast:  # as sample.py samples
            images = ema.generate(y, generator=torch.Generator(device).manual_seed(train_cfg.seed))
    name = f"{'reconstructions' if stage == 1 else 'samples'}_{step:07d}.png"
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    data.save_grid(images, 8, os.path.join(train_cfg.out_dir, name))
    if stage == 2 and train_cfg.dataset == "shapes":
        accuracy = data.class_accuracy(data.shape_judge(image_size, train_cfg.out_dir), images, y.cpu().numpy())[0]
        print0(f"{name}: class accuracy {100 * accuracy:.0f}% of its {len(y)} samples (the shapes judge)")


@torch.no_grad()
def held_out_losses(model, probes, seed, autocast):
    """Stage 2's loss terms in eval mode on fixed batches {name: (x, y)} (training images "seen", and "heldout"), with
    the same noise each time: a held-out loss that climbs while the seen one falls is memorisation."""
    model.eval()
    terms = {}
    for name, (x, y) in probes.items():
        with autocast:
            loss = model(x, y, generator=torch.Generator(y.device).manual_seed(seed))
        terms.update({f"{k}_{name}": round(v.item(), 5) for k, v in loss.items() if k != "loss"})
    model.train()
    return terms


def resume(path, stage, model, ema, optimizer, config, train_cfg, world):
    """Load the checkpoint `path` of this stage into the model, its EMA and the optimizer -> its (step, data position,
    finished), or fail() in one line if it was made with another config (RESUME_FIXED, the tokenizer's and the model's
    but for SAMPLING_FIELDS) or tokenizer."""
    ckpt, _ = data.load_checkpoint(path, stage, weights="model")
    for part in ("train", "tokenizer", "model")[:stage + 1]:
        saved, fixed = ckpt["config"][part], RESUME_FIXED + (("tokenizer", "model")[stage - 1] + "_base_lr",)
        keys = fixed if part == "train" else [k for k in config[part] if k not in SAMPLING_FIELDS]
        changed = {k: (saved.get(k), config[part][k]) for k in keys if saved.get(k) != config[part][k]}
        if changed:
            fail(f"{path} was made with another {part} config, field: (checkpoint, now): {changed}; leave out --resume "
                 f"to start again")
    if stage == 2:  # the configs may match while tokenizer.pt was retrained, or another --tokenizer passed
        saved = {k.removeprefix("tokenizer."): v for k, v in ckpt["model"].items() if k.startswith("tokenizer.")}
        if not all(torch.equal(v.cpu(), saved[k]) for k, v in model.tokenizer.state_dict().items()):
            fail(f"{path} was trained on other tokenizer weights than {tokenizer_path(train_cfg)} holds now: resume "
                 f"with the tokenizer it was trained on, or leave out --resume to train stage 2 anew")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the kernel of this device, not the checkpoint's
        group["fused"], group["foreach"] = next(model.parameters()).device.type == "cuda", None
    if ckpt.get("world", world) != world:
        print0(f"{path} was written by {ckpt['world']} processes, resumed by {world}: the random draws differ from "
               f"an uninterrupted run's")
    for p, moments in optimizer.state.items():  # a CPU stage 1 is channels_last: the moments take the weights' layout
        for k, v in moments.items():
            if k != "step" and v.shape == p.shape:
                moments[k] = torch.empty_like(p).copy_(v)
    return ckpt["step"], (ckpt["data"]["epoch"], ckpt["data"]["index"]), ckpt["finished"]


def train_stage(stage, model, dataset, train_cfg, config, rank, world, device):
    """Stage 1 trains the Tokenizer and then fits its latent statistics; stage 2 trains DisCon on the frozen tokenizer.
    Writes out_dir/tokenizer.pt or out_dir/model.pt; with --resume it continues from that file."""
    name = ("tokenizer", "model")[stage - 1]
    steps, lr = getattr(train_cfg, name + "_steps"), getattr(train_cfg, name + "_base_lr") * train_cfg.batch_size / 256
    path, log_path = os.path.join(train_cfg.out_dir, name + ".pt"), os.path.join(train_cfg.out_dir, "log.jsonl")
    image_size = config["tokenizer"]["image_size"]
    # channels_last for stage 1 on a CPU: chosen by measurement (docs/experiments.md); unmeasured on GPUs.
    channels_last = stage == 1 and device.type == "cpu"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, lr, train_cfg, device)
    step, position, finished = 0, (0, 0), False
    if train_cfg.resume and os.path.exists(path):
        step, position, finished = resume(path, stage, model, ema, optimizer, config, train_cfg, world)
        if step > steps:
            fail(f"{path} is at step {step}, beyond --{name}_steps {steps}: pass --{name}_steps {step} or more to "
                 f"continue it, or leave out --resume to start again")
        print0(f"stage {stage}: {'already finished in' if finished and step == steps else 'resuming from'} {path} at "
               f"step {step}")
        if finished and step == steps:
            return
    if rank == 0 and os.path.exists(log_path):  # a resumed run logs its steps again: drop their lines (and a torn one)
        lines = [line for line in open(log_path) if line.endswith("}\n")]
        kept = "".join(line for line in lines if (json.loads(line)["stage"], json.loads(line)["step"]) <= (stage, step))
        data.atomic_write(log_path, lambda f: f.write(kept.encode()))
    net = model
    if world > 1:  # stage 2's buffers (the frozen tokenizer's) are equal on every process: no broadcast
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=stage == 1)
    # Compiled around DDP, as PyTorch advises. Stage 1 stays eager: its dead-code restart and collectives break the
    # graph, and torch 2.13's compiled backward of its VQ loss failed.
    net = torch.compile(net) if train_cfg.compile and stage == 2 else net
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    latents = None
    if stage == 2 and train_cfg.cache_latents:
        latents = data.encode_dataset(model.tokenizer, dataset[0], device, image_size)
    generator, micro = torch.Generator(device), train_cfg.batch_size // (world * train_cfg.grad_accum)
    heldout = data.load_dataset(train_cfg.dataset, train_cfg.data_dir, image_size, "heldout") if stage == 2 else None
    probes = {}
    for split, (images, labels, _) in (("seen", dataset), ("heldout", heldout)) if heldout else ():
        index = data.balanced_subset(labels, 128)  # 128 fixed images of each, encoded once
        x = model.tokenizer.encode(data.to_model_input(images[index], device, image_size))
        probes[split] = x, data.to_device(labels[index], device)
    bar = data.progress(total=steps, initial=step, desc=f"stage {stage}")
    logged, logged_steps, t0 = 0, 0, time.time()
    model.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, train_cfg)
        x, y, position = data.get_batch(dataset, position, train_cfg.batch_size, train_cfg.seed, rank, world, device,
                                        image_size, latents)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # The model's noise comes from `generator`, dropout's from the global RNG: both are seeded from (seed, stage,
        # step, rank) at every step, which makes --resume exact on every process.
        generator.manual_seed(data.derived_seed(train_cfg.seed, stage, step, rank, 0))
        torch.manual_seed(data.derived_seed(train_cfg.seed, stage, step, rank, 1))
        micro_x = list(zip(*(t.split(micro) for t in x))) if isinstance(x, tuple) else x.split(micro)
        for i, (xi, yi) in enumerate(zip(micro_x, y.split(micro))):
            # DDP averages the gradients on the last micro-step only; dividing by grad_accum makes their sum the
            # gradient of the mean loss over the global batch.
            with net.no_sync() if world > 1 and i < train_cfg.grad_accum - 1 else nullcontext(), autocast:
                terms = net(xi, generator=generator) if stage == 1 else net(xi, yi, generator=generator)
            (terms["loss"] / train_cfg.grad_accum).backward()
            logged = logged + torch.stack([v.detach().float() for v in terms.values()]) / train_cfg.grad_accum
        # Stage 2 clips the prior's and the continuous model's gradients each on its own, so that a `discon` model's
        # prior trains as the `discrete` model of its seed. The log's grad_norm is the larger of the two.
        parts = [getattr(model, name) for name in ("prior", "continuous") if hasattr(model, name)] or [model]
        grad_norm = torch.stack([nn.utils.clip_grad_norm_(part.parameters(), train_cfg.grad_clip or float("inf"))
                                 for part in parts]).max()
        log, save, preview = (step + 1 == steps or (step + 1) % k == 0
                              for k in (train_cfg.log_every, train_cfg.ckpt_every, train_cfg.sample_every))
        # Reading the norm makes the host wait for the device: only at the steps that wait anyway. A non-finite loss
        # gives a non-finite norm, the same on every process, so all stop together, before a bad checkpoint.
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
            means, seconds = (logged / (world * logged_steps)).tolist(), time.time() - t0
            line = {"stage": stage, "step": step, **{k: round(v, 5) for k, v in zip(terms, means)},
                    **(held_out_losses(model, probes, train_cfg.seed, autocast) if probes and rank == 0 else {}),
                    "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm.item(), 4),
                    "images_per_s": round(logged_steps * train_cfg.batch_size / seconds, 1)}
            print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
            if rank == 0:
                with open(log_path, "a") as f:  # synced as a checkpoint is: a crash loses no line before one
                    f.write(json.dumps(line) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            logged, logged_steps, t0 = 0, 0, time.time()
        if rank == 0 and save:
            if stage == 1 and step == steps:  # the final EMA tokenizer's per-channel latent statistics
                ema.fit_latent_stats(data.model_inputs(dataset[0], data.balanced_subset(dataset[1], 10_000), device,
                                                       image_size))
            checkpoint = {"stage": stage, "step": step, "finished": step == steps, "world": world,
                          "data": {"epoch": position[0], "index": position[1]}, "config": config,
                          "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
            data.atomic_write(path, lambda f: torch.save(checkpoint, f))
        if rank == 0 and preview:
            save_preview(stage, ema, dataset, step, train_cfg, device, image_size, autocast)
    bar.close()
    data.barrier()  # stage 2 reads the tokenizer checkpoint that rank 0 has just written


def tokenizer_path(train_cfg):
    """The stage-1 checkpoint that stage 2 builds on: --tokenizer, else tokenizer.pt in --out_dir."""
    return train_cfg.tokenizer or os.path.join(train_cfg.out_dir, "tokenizer.pt")


def main(argv=None):
    train_cfg, tok_cfg, model_cfg = make_configs(argv)
    if train_cfg.deterministic:
        make_deterministic()
    rank, local_rank, world, device = data.setup_distributed()
    try:
        if train_cfg.batch_size % (world * train_cfg.grad_accum):
            fail(f"--batch_size {train_cfg.batch_size} is not divisible by processes x --grad_accum = "
                 f"{world * train_cfg.grad_accum}")
        if train_cfg.tokenizer and train_cfg.stage != "2":
            fail("--tokenizer starts stage 2 from an existing tokenizer: use it with --stage 2")
        tok_path, tokenizer = tokenizer_path(train_cfg), None
        if train_cfg.stage == "2":  # the tokenizer checkpoint sets the tokenizer config (and the image size)
            if not os.path.exists(tok_path):
                fail(f"no tokenizer checkpoint at {tok_path}: run stage 1 first or pass --tokenizer PATH")
            ckpt, tokenizer = data.load_checkpoint(tok_path, stage=1)
            if not ckpt["finished"]:
                fail(f"{tok_path} is unfinished: finish stage 1 with --stage 1 --resume")
            if (trained_on := ckpt["config"]["train"]["dataset"]) != train_cfg.dataset:  # stage 1's data is stage 2's
                fail(f"{tok_path} was trained on --dataset {trained_on}, not {train_cfg.dataset}: stage 2 trains on "
                     f"stage 1's data, pass its --dataset (and --data_dir)")
            tok_cfg = tokenizer.cfg
        if rank == 0:
            data.writable_or_fail(train_cfg.out_dir, clean=True)
        if local_rank == 0:
            data.prepare_data(train_cfg.dataset, train_cfg.data_dir, tok_cfg.image_size)
        data.barrier()
        dataset = data.load_dataset(train_cfg.dataset, train_cfg.data_dir, tok_cfg.image_size)
        if len(dataset[1]) < train_cfg.batch_size:
            fail(f"--batch_size {train_cfg.batch_size} is more than the {len(dataset[1])} images of the dataset")
        if dataset[1].min() < 0 or dataset[1].max() >= dataset[2]:  # checked once here, not at every step
            fail(f"the labels of {train_cfg.data_dir} are not all in [0, {dataset[2]})")
        model_cfg.num_classes = dataset[2]
        print0(f"{train_cfg.dataset}: {len(dataset[1])} images, {dataset[2]} classes; {world} process(es) on {device}")
        config = {"train": asdict(train_cfg), "tokenizer": asdict(tok_cfg), "model": asdict(model_cfg)}
        if train_cfg.stage in ("1", "both"):
            torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
            train_stage(1, discon.Tokenizer(tok_cfg), dataset, train_cfg, config, rank, world, device)
        if train_cfg.stage in ("2", "both"):
            if tokenizer is None:
                tokenizer = data.load_checkpoint(tok_path, stage=1)[1]
            torch.manual_seed(train_cfg.seed)
            try:
                model = discon.DisCon(model_cfg, tokenizer)
            except ValueError as e:  # a field that only the tokenizer's grid bounds (sampling_steps)
                fail(f"--{e}")
            train_stage(2, model, dataset, train_cfg, config, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
