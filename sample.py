"""
Sample images from a stage-2 checkpoint of train.py (model.pt): an .npz in the ADM evaluator's format (arr_0:
n x H x W x 3 uint8, and labels), a PNG grid with a row per class, optionally one PNG per image, and FID (fid.py).
  python sample.py out/model.pt --num-images 1000 --batch-size 500
  torchrun --nproc_per_node 8 sample.py runs/in64/model.pt --num-images 50000 --batch-size 250 --fid-ref ref.npz
Batch b is drawn from a seed of (--seed, b): the images do not depend on the number of processes, but they do on
--batch-size. From tokenizer.pt, it reconstructs training images through each view, with each one's rFID instead.
"""
import argparse
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import discon
import fid
from data import fail, print0

POSITIVE = ("num_images", "batch_size", "discrete_temperature", "continuous_temperature", "sampling_steps",
            "diffusion_steps")
NON_NEGATIVE = ("seed", "top_k", "discrete_guidance", "continuous_guidance")


def make_parser():
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model.pt samples, tokenizer.pt reconstructs")
    p.add_argument("--out", default="", help="output directory (default: beside the checkpoint)")
    p.add_argument("--num-images", type=int, default=100, help="images to sample or reconstruct (default 100)")
    p.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="comma-separated class ids, repeated to --num-images (default: every class equally often)")
    p.add_argument("--batch-size", type=int, default=100, help="images per generate call (default 100)")
    p.add_argument("--seed", type=int, default=0, help="with the batch's index, seeds each batch (default 0)")
    for phase in ("discrete", "continuous"):  # each phase's own settings; none falls back to the other phase's
        p.add_argument(f"--{phase}-guidance", type=float, help=f"the {phase} phase's guidance scale, 1 = none")
        p.add_argument(f"--{phase}-temperature", type=float, help=f"the {phase} phase's temperature")
    p.add_argument("--sampling-steps", type=int, help="steps of the continuous model")
    p.add_argument("--diffusion-steps", type=int, help="reverse-diffusion steps of the head, per token")
    p.add_argument("--top-k", type=int, default=0, help="sample d from the k likeliest codes; 0 = every code")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of their EMA")
    p.add_argument("--real-codes", action="store_true", help="discon mode: condition on the d (and labels) of "
                   "--num-images training images instead of sampling d: p(c | d, y) alone")
    p.add_argument("--discrete-only", action="store_true", help="discon mode: decode the sampled d instead of "
                   "sampling c: the `discrete` baseline on this model's prior, with the d of the same --seed")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on a GPU only)")
    p.add_argument("--save-pngs", action="store_true", help="also write one PNG per image")
    p.add_argument("--fid-ref", default="", help="reference statistics .npz for FID (default: no FID)")
    p.add_argument("--save-fid-ref", default="", help="instead, write this .npz: the FID reference statistics of "
                   "10,000 class-balanced training images")
    p.add_argument("--fid-mode", default="pytorch-fid", choices=fid.MODES, help="fid.py's preprocessing, as the "
                   "reference statistics were made (tf for published numbers)")
    p.add_argument("--fid-weights", help="Inception weights for fid.py (default: its download)")
    p.epilog = "Settings without a default take the checkpoint's config value."
    return p


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(args, name)
        if value is not None and not (value > 0 or value == 0 and name in NON_NEGATIVE):  # NaN fails both
            parser.error(f"--{name.replace('_', '-')} must be {'> 0' if name in POSITIVE else '>= 0'}, got {value}")
    rank, _, world, device = data.setup_distributed()
    try:
        ckpt, model = data.load_checkpoint(args.checkpoint, weights="model" if args.no_ema else "ema")
        model.to(device).eval()
        if args.save_fid_ref:
            return save_fid_ref(args, ckpt, device) if rank == 0 else None
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                       "samples" if ckpt["stage"] == 2 else "reconstructions")
        inception = None
        if rank == 0:  # the outputs and FID's inputs are checked before the work, not after it
            data.writable_or_fail(out, clean=True)
            if args.fid_ref:
                inception = load_inception(args.fid_weights, device, statistics=args.fid_ref)
        if ckpt["stage"] == 1 and rank == 0:
            originals, labels = data.training_images(ckpt["config"], args.num_images)
            for name, images in reconstruct(model, originals, args.batch_size, device).items():
                report(args, ckpt, images, labels, out, name, inception)
        elif ckpt["stage"] == 2:
            images, labels = sample(args, ckpt, model, rank, world, device)
            if rank == 0:
                report(args, ckpt, images, labels, out, "samples", inception)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sample(args, ckpt, model, rank, world, device):
    """-> (images (n, H, W, 3) uint8, labels (n,)) on rank 0, gathered from every process; (None, labels) elsewhere."""
    cfg = model.cfg
    if (args.real_codes or args.discrete_only) and cfg.mode != "discon":
        fail(f"--real-codes and --discrete-only need a discon-mode model, this one is {cfg.mode!r}")
    if (args.diffusion_steps or 0) > cfg.num_timesteps or (args.sampling_steps or 0) > model.num_tokens:
        fail(f"--diffusion-steps must be <= {cfg.num_timesteps}, --sampling-steps <= {model.num_tokens}")
    real_images = None
    if args.real_codes:  # the training images whose discrete grids condition the continuous model
        real_images, labels = data.training_images(ckpt["config"], args.num_images)
    elif args.labels:
        if min(args.labels) < 0 or max(args.labels) >= cfg.num_classes:
            fail(f"--labels must be class ids in [0, {cfg.num_classes})")
        labels = np.resize(args.labels, args.num_images)
    else:  # class-balanced, as the papers' FID protocol (50 per class on ImageNet)
        if args.num_images % cfg.num_classes:
            fail(f"--num-images {args.num_images} is not divisible by the {cfg.num_classes} classes: pass a multiple "
                 f"of {cfg.num_classes} or give --labels")
        labels = np.repeat(np.arange(cfg.num_classes), args.num_images // cfg.num_classes)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    settings = {k: getattr(args, k) for k in POSITIVE[2:] + NON_NEGATIVE[2:]}  # None: the config's
    print0(f"sampling {len(labels)} images, {cfg.mode} mode, " + ", ".join(
        f"{k} {getattr(cfg, k) if v is None else v}" for k, v in settings.items()))
    mine = []  # batches are dealt round-robin to the processes
    for b in data.progress(range(rank, -(-len(labels) // args.batch_size), world), desc="sampling"):
        index = np.arange(b * args.batch_size, min((b + 1) * args.batch_size, len(labels)))
        codes = None if real_images is None else model.tokenizer.encode(
            data.to_model_input(real_images[index], device, model.tokenizer.cfg.image_size))[1]
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            images = model.generate(data.to_device(labels[index], device), **settings, top_k=args.top_k, codes=codes,
                                    discrete_only=args.discrete_only,
                                    generator=torch.Generator(device).manual_seed(data.derived_seed(args.seed, b)))
        mine.append((b, images.permute(0, 2, 3, 1).cpu().numpy()))                     # (B, H, W, 3) uint8
    if world > 1:  # every process's batches to rank 0 alone (50,000 images of 64x64 are 614 MB)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        mine = [item for part in gathered or [] for item in part]
    if rank != 0:
        return None, labels
    return np.concatenate([x for _, x in sorted(mine, key=lambda item: item[0])]), labels  # in label order


@torch.no_grad()
def reconstruct(tokenizer, originals, batch_size, device):
    """-> {"continuous": decode(c), "discrete": decode_codes(d)} of uint8 images (n, H, W, 3), each (n, H, W, 3)."""
    views = {"continuous": [], "discrete": []}
    for i in data.progress(range(0, len(originals), batch_size), desc="reconstructing"):
        c, d = tokenizer.encode(data.to_model_input(originals[i:i + batch_size], device, tokenizer.cfg.image_size))
        for name, x in (("continuous", tokenizer.decode(c)), ("discrete", tokenizer.decode_codes(d))):
            views[name].append(discon.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in views.items()}


def report(args, ckpt, images, labels, out, name, inception):
    """Write the images as NAME_{n}x{H}x{W}x3.npz and a grid NAME.png (a row per class, 10 classes and images at most),
    then print the shapes judge's class accuracy and FID where they apply."""
    n, h, w, _ = images.shape
    npz = os.path.join(out, f"{name}_{n}x{h}x{w}x3.npz")
    data.atomic_write(npz, lambda f: np.savez(f, arr_0=images, labels=labels))
    rows = [images[labels == k][:10] for k in dict.fromkeys(labels.tolist())][:10]
    data.save_grid(np.concatenate([np.concatenate([r, np.zeros((10 - len(r), h, w, 3), np.uint8)]) for r in rows]),
                   10, os.path.join(out, f"{name}.png"))
    if args.save_pngs:
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(os.path.join(out, name, f"{i:06d}_class{label}.png"))
    print0(f"wrote {npz} and {os.path.join(out, name + '.png')}")
    if ckpt["config"]["train"]["dataset"] == "shapes":
        judge = data.shape_judge(h, cache_dir=os.path.dirname(os.path.abspath(args.checkpoint)))
        overall, per_class = data.class_accuracy(judge, images, labels)
        print0(f"class accuracy {100 * overall:.1f}% ({name}, {n} images; per class: "
               + ", ".join(f"{k} {100 * a:.0f}%" for k, a in per_class.items()) + ")")
    if inception is not None:
        try:
            score = fid.fid_from_images(images, args.fid_ref, args.fid_mode, inception)
        except (ValueError, RuntimeError, OSError) as e:
            fail(f"the images are written, but FID failed: {e}")
        print0(f"FID {score:.3f} ({name}, {n} images vs {args.fid_ref}, fid.py mode={args.fid_mode})")


def save_fid_ref(args, ckpt, device, n=10_000):
    """--save-fid-ref: the statistics that README's FID figures are measured against (about 15 min on 2 CPU cores)."""
    if not args.save_fid_ref.endswith(".npz"):
        fail(f"--save-fid-ref {args.save_fid_ref}: the statistics file must end in .npz")
    data.writable_or_fail(os.path.dirname(os.path.abspath(args.save_fid_ref)))
    inception = load_inception(args.fid_weights, device)
    images = np.asarray(data.training_images(ckpt["config"], n)[0])
    mu, sigma = fid.statistics_from_features(fid.compute_features(images, inception, args.fid_mode, progress=True)[0])
    data.atomic_write(args.save_fid_ref, lambda f: np.savez_compressed(f, mu=mu, sigma=sigma, mode=args.fid_mode,
                                                                       num_images=len(images)))
    print0(f"wrote the statistics of {len(images)} training images to {args.save_fid_ref} (fid.py mode="
           f"{args.fid_mode}, weights {inception.weights_path})")


def load_inception(weights, device, statistics=None):
    """fid.py's Inception, after a check that the statistics file reads, or fail() in one line."""
    try:
        if statistics and not os.path.isfile(statistics):
            raise ValueError(f"{statistics}: no such file")
        fid.load_statistics(statistics)
        return fid.load_inception(weights, device)
    except (ValueError, RuntimeError, OSError) as e:
        fail(f"--fid-ref or --fid-weights: {e}")


if __name__ == "__main__":
    main()
