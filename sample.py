"""
Generate images from a stage-2 checkpoint (train.py's model.pt): a PNG grid, an .npz in the ADM evaluator's format
(arr_0: N x H x W x 3 uint8, and labels), optionally one PNG per image, and optionally FID through fid.py.
  python sample.py out/model.pt --num-images 100 --guidance 2.0
  python sample.py out/model.pt --labels 3,7 --num-images 16 --save-pngs
  torchrun --nproc_per_node 8 sample.py runs/in64/model.pt --num-images 50000 --batch-size 250 --fid-ref ref.npz
Batch b is drawn with a seed derived from (--seed, b), so the images do not depend on the number of processes, but
they do depend on --batch-size.
Given a stage-1 checkpoint (tokenizer.pt), it reconstructs --num-images training images (a seeded, class-balanced
subset) through both views instead (one process), and with --fid-ref reports the reconstruction FID of each: the
paper's Figure 1 measurement.
  python sample.py out/tokenizer.pt --num-images 1000 --fid-ref ref.npz
"""
import argparse
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import discon
import fid
import train
from fid import atomic_write, positive
from train import derived_seed, fail, load_checkpoint, print0, progress, save_grid, setup_distributed


def make_parser():
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=fid.HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="a checkpoint written by train.py: model.pt samples, tokenizer.pt reconstructs")
    p.add_argument("--out", default="", help="output directory (empty: samples/ or reconstructions/ beside the "
                                              "checkpoint)")
    p.add_argument("--num-images", type=positive(int), default=100, help="images to sample (or reconstruct)")
    p.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="comma-separated class ids, repeated to --num-images (None: every class equally often)")
    p.add_argument("--batch-size", type=positive(int), default=100,
                   help="images per generate call. Batch b is drawn from a seed of (--seed, b), so another batch size "
                        "draws other images: compare runs at the same batch size")
    p.add_argument("--guidance", type=positive(float, zero=True), default=None,
                   help="classifier-free guidance scale of both phases (1 = none), unless --guidance-continuous is "
                        "given (None: the model config's, measured in README.md)")
    p.add_argument("--guidance-continuous", type=positive(float, zero=True), default=None,
                   help="the guidance scale of the continuous phase alone (discon and continuous modes; None: as "
                        "--guidance, or the model config's)")
    p.add_argument("--temperature", type=positive(float), default=None,
                   help="divides the logits of d and, unless --temperature-continuous is given, scales the diffusion "
                        "noise of c (MAR) (None: the model config's)")
    p.add_argument("--temperature-continuous", type=positive(float), default=None,
                   help="scales the diffusion noise of c alone (discon and continuous modes; None: as --temperature, "
                        "or the model config's)")
    p.add_argument("--top-k", type=positive(int, zero=True), default=0, help="sample d from the k likeliest codes; "
                                                                                "0 = from every code")
    p.add_argument("--diffusion-steps", type=positive(int), default=None,
                   help="respaced reverse diffusion steps per continuous token (None: the model config's)")
    p.add_argument("--sampling-steps", type=positive(int), default=None,
                   help="K, the continuous model's steps, each revealing several tokens (None: the model config's)")
    p.add_argument("--seed", type=positive(int, zero=True), default=0, help="with the batch index, seeds each batch")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--real-codes", action="store_true",
                   help="discon mode: condition on the discrete grids (and labels) of --num-images training images "
                        "(a seeded, class-balanced subset) instead of sampling d: p(c | d, y) alone")
    p.add_argument("--discrete-only", action="store_true",
                   help="discon mode: decode the sampled d's codebook vectors instead of sampling c: the `discrete` "
                        "baseline on this model's own prior, with the same d as the DisCon samples of the same --seed "
                        "and --batch-size")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on a GPU only); the diffusion chain's arithmetic stays float32")
    p.add_argument("--head-autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="run the diffusion head's layers under that autocast too (default: the model config's)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each continuous sampling step from a CUDA graph (default: on a GPU only)")
    p.add_argument("--save-pngs", action="store_true", help="also write one PNG per image")
    p.add_argument("--fid-ref", default="", help="reference statistics .npz (fid.py --save-stats) for FID; empty: "
                                                  "no FID")
    p.add_argument("--save-fid-ref", default="",
                   help="instead of sampling, write the FID reference statistics of 10,000 class-balanced training "
                        "images of the checkpoint's dataset (in --fid-mode) to this .npz, for --fid-ref")
    p.add_argument("--fid-mode", default="pytorch-fid", choices=fid.MODES,
                   help="fid.py's preprocessing: the mode the reference statistics were made in (tf for published "
                        "numbers, README.md)")
    p.add_argument("--fid-weights", default=None, help="Inception weights for fid.py (None: its download)")
    return p


def main(argv=None):
    args = fid.parse_flags(make_parser(), argv)
    rank, local_rank, world, device = setup_distributed()
    try:
        generate(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def generate(args, rank, world, device):
    ckpt = load_checkpoint(args.checkpoint)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   "reconstructions" if ckpt["stage"] == 1 else "samples")
    if args.save_fid_ref:
        return save_reference(args, ckpt, device) if rank == 0 else None
    if rank == 0:  # the outputs and FID's inputs are checked before the work, not after it
        train.writable_or_fail(out, clean=True)
        args.inception = load_inception_or_fail(args) if args.fid_ref else None
    if ckpt["stage"] == 1:
        return reconstruct(args, ckpt, out, device) if rank == 0 else None
    model = discon.build_model(ckpt["config"]["tokenizer"], ckpt["config"]["model"])
    train.load_weights(model, ckpt["model" if args.no_ema else "ema"], args.checkpoint)
    model.to(device).eval()
    num_classes = model.cfg.num_classes
    if args.diffusion_steps and args.diffusion_steps > model.cfg.num_timesteps:
        fail(f"--diffusion-steps {args.diffusion_steps} is more than the model's {model.cfg.num_timesteps} timesteps")

    if args.discrete_only and (model.cfg.mode != "discon" or args.real_codes):
        fail("--discrete-only decodes the sampled d of a discon-mode model: "
             + (f"this one is {model.cfg.mode!r}" if model.cfg.mode != "discon" else "leave out --real-codes"))
    if args.sampling_steps and args.sampling_steps > model.num_tokens:
        fail(f"--sampling-steps {args.sampling_steps} is more than the model's {model.num_tokens} tokens")
    real_images = None
    if args.real_codes:  # the training images whose discrete grids condition the continuous stage
        if model.cfg.mode != "discon":
            fail(f"--real-codes needs a discon-mode model, this one is {model.cfg.mode!r}")
        real_images, labels = training_images(ckpt, args.num_images)
    elif args.labels:  # the given classes, repeated to the requested number of images
        if min(args.labels) < 0 or max(args.labels) >= num_classes:
            fail(f"--labels must be class ids in [0, {num_classes})")
        labels = np.resize(args.labels, args.num_images)
    else:  # class-balanced, as the FID protocol of the papers compared with (e.g. 50 per class on ImageNet)
        if args.num_images % num_classes:
            fail(f"--num-images {args.num_images} is not divisible by the {num_classes} classes; "
                 f"pass a multiple of {num_classes} or give --labels")
        labels = np.repeat(np.arange(num_classes), args.num_images // num_classes)
    batches = [np.arange(i, min(i + args.batch_size, len(labels))) for i in range(0, len(labels), args.batch_size)]

    # Batches are dealt round-robin to the processes; each batch has its own generator seeded from (seed, b).
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    mine = []
    for b in progress(range(rank, len(batches), world), desc="sampling"):
        y = train.to_device(labels[batches[b]], device)
        generator = torch.Generator(device).manual_seed(derived_seed(args.seed, b))
        codes = None
        if real_images is not None:
            x = train.to_model_input(real_images[batches[b]], device, model.tokenizer.cfg.image_size)
            codes = model.tokenizer.encode(x)[1]
        with autocast:
            images = model.generate(y, args.guidance, args.guidance_continuous, temperature=args.temperature,
                                    top_k=args.top_k, diffusion_steps=args.diffusion_steps, generator=generator,
                                    codes=codes, temperature_continuous=args.temperature_continuous,
                                    sampling_steps=args.sampling_steps, discrete_only=args.discrete_only,
                                    head_autocast=args.head_autocast, graphs=graphs)
        mine.append((b, images.permute(0, 2, 3, 1).cpu().numpy()))                     # (B, H, W, 3) uint8
    if world > 1:  # every process's batches to rank 0 only (50k images of 64x64 are 614 MB)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        mine = [item for part in gathered or [] for item in part]
    if rank != 0:
        return
    images = np.concatenate([x for _, x in sorted(mine, key=lambda item: item[0])])   # (N, H, W, 3) in label order

    n, h, w, _ = images.shape
    npz = os.path.join(out, f"samples_{n}x{h}x{w}x3.npz")
    atomic_write(npz, lambda f: np.savez(f, arr_0=images, labels=labels))
    # The grid: one row per class (10 classes and 10 images each at most), in label order.
    rows = [images[labels == k][:10] for k in dict.fromkeys(labels.tolist())][:10]
    grid = np.concatenate([np.concatenate([r, np.zeros((10 - len(r), h, w, 3), np.uint8)]) for r in rows])
    save_grid(grid, 10, os.path.join(out, "grid.png"))
    if args.save_pngs:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(os.path.join(out, "images", f"{i:06d}_class{label}.png"))
    print0(f"wrote {npz} and {os.path.join(out, 'grid.png')}")
    if ckpt["config"]["train"]["dataset"] == "shapes":
        print_class_accuracy(images, labels, args.checkpoint, "samples")
    if args.fid_ref:
        score = fid_or_fail(args, images, device)
        cfg = model.cfg
        guidance, guidance_continuous, temperature, temperature_continuous = model.sampling_settings(
            args.guidance, args.guidance_continuous, args.temperature, args.temperature_continuous)
        discrete = f"guidance {guidance}, temperature {temperature}"
        head = cfg.head_autocast if args.head_autocast is None else args.head_autocast
        continuous = (f"guidance {guidance_continuous}, temperature {temperature_continuous}, "
                      f"{args.sampling_steps or cfg.sampling_steps} sampling steps, "
                      + (f"bf16 autocast with the head in {'bf16' if head else 'float32'}" if bf16 else "float32"))
        settings = {"discrete": discrete, "continuous": continuous,
                    "discon": f"d: {discrete}; c: {continuous}"}["discrete" if args.discrete_only else cfg.mode]
        print0(f"FID {score:.3f} ({n} samples vs {args.fid_ref}, fid.py mode={args.fid_mode}, {settings}, "
               f"{'decoded d' if args.discrete_only or cfg.mode == 'discrete' else 'decoded c'}, "
               f"{'raw' if args.no_ema else 'EMA'} weights)")


def training_images(ckpt, n):
    """n training images of the checkpoint's dataset, a seeded and class-balanced subset, and their labels."""
    data = ckpt["config"]["train"]
    images, labels, _ = train.load_dataset(data["dataset"], data["data_dir"], ckpt["config"]["tokenizer"]["image_size"])
    subset = train.balanced_subset(labels, n)
    return images[subset], labels[subset]


def print_class_accuracy(images, labels, checkpoint, what):
    """The shapes judge's verdict (train.shape_judge, cached beside the checkpoint): overall and per class."""
    judge = train.shape_judge(images.shape[1], cache_dir=os.path.dirname(os.path.abspath(checkpoint)))
    overall, per_class = train.class_accuracy(judge, images, labels)
    print0(f"class accuracy {100 * overall:.1f}% ({what}, {len(images)} images; per class: "
           + ", ".join(f"{name} {100 * a:.0f}%" for name, a in per_class.items()) + ")")


def save_reference(args, ckpt, device, n=10_000):
    """--save-fid-ref: the statistics that README's FID figures are measured against (about 15 min on 2 CPU cores)."""
    if not args.save_fid_ref.endswith(".npz"):
        fail(f"--save-fid-ref {args.save_fid_ref}: the statistics file must end in .npz")
    train.writable_or_fail(os.path.dirname(os.path.abspath(args.save_fid_ref)))
    try:
        inception = fid.load_inception(args.fid_weights, device)
    except (ValueError, RuntimeError, OSError) as e:
        fail(f"--fid-weights: {e}")
    images, _ = training_images(ckpt, n)
    features = fid.compute_features(np.asarray(images), inception, args.fid_mode, device=device, progress=True)[0]
    mu, sigma = fid.statistics_from_features(features)
    atomic_write(args.save_fid_ref, lambda f: np.savez_compressed(f, mu=mu, sigma=sigma, mode=args.fid_mode,
                                                                  num_images=len(features)))
    print0(f"wrote the statistics of {len(features)} training images to {args.save_fid_ref} "
           f"(fid.py mode={args.fid_mode}, weights {inception.weights_path})")


def load_inception_or_fail(args):
    if not os.path.exists(args.fid_ref):
        fail(f"--fid-ref {args.fid_ref}: no such file or folder")
    try:
        fid.load_statistics(args.fid_ref)  # reads a statistics .npz: a damaged one fails here
        return fid.load_inception(args.fid_weights, "cpu")
    except (ValueError, RuntimeError, OSError) as e:
        fail(f"--fid-ref or --fid-weights: {e}")


def fid_or_fail(args, images, device):
    try:
        inception = args.inception.to(device)
        return fid.fid_from_images(images, args.fid_ref, mode=args.fid_mode, model=inception, device=device)
    except (ValueError, RuntimeError, OSError) as e:
        fail(f"the images are written, but FID failed: {e}")


@torch.no_grad()
def reconstruct(args, ckpt, out, device):
    """Stage 1: --num-images training images through decode(c) and decode_codes(d), and their rFID."""
    tokenizer = discon.Tokenizer(discon.TokenizerConfig(**ckpt["config"]["tokenizer"]))
    train.load_weights(tokenizer, ckpt["model" if args.no_ema else "ema"], args.checkpoint)
    tokenizer.to(device).eval()
    originals, labels = training_images(ckpt, args.num_images)
    views = {"continuous": [], "discrete": []}
    for i in progress(range(0, len(originals), args.batch_size), desc="reconstructing"):
        x = train.to_model_input(originals[i:i + args.batch_size], device, tokenizer.cfg.image_size)
        c, d = tokenizer.encode(x)
        for name, x in (("continuous", tokenizer.decode(c)), ("discrete", tokenizer.decode_codes(d))):
            views[name].append(discon.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    rows = [np.asarray(originals[:10])]
    for name, parts in views.items():
        images = np.concatenate(parts)
        atomic_write(os.path.join(out, f"{name}_{len(images)}.npz"), lambda f: np.savez(f, arr_0=images))
        rows.append(images[:10])
        if ckpt["config"]["train"]["dataset"] == "shapes":
            print_class_accuracy(images, labels, args.checkpoint, f"{name} reconstructions")
        if args.fid_ref:
            print0(f"rFID {fid_or_fail(args, images, device):.3f} ({name} view, {len(images)} training images vs "
                   f"{args.fid_ref}, fid.py mode={args.fid_mode})")
    save_grid(np.concatenate(rows), 10, os.path.join(out, "grid.png"))  # rows: original, continuous, discrete
    print0(f"wrote the reconstructions and {os.path.join(out, 'grid.png')}")


if __name__ == "__main__":
    main()
