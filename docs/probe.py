"""What limits p(c | d, y)? (docs/experiments.md, "What limits the continuous stage")

    python docs/probe.py runs/quick/model.pt runs/shapes_stats.npz --weights $W

On 1000 class-balanced training images (data.training_images, as sample.py --real-codes), class accuracy and FID
against the reference statistics of, one row each:

- decode(c + s N(0, 1)) for each --noise s: how much unstructured latent noise the decoder tolerates;
- decode_codes(d): the discrete view;
- teacher-forced: each position's c_i sampled by the continuous model given the real d, the real label and the real
  c of every other position (one forward per position), then the grid decoded;
- free-running: the model's own sampler given the real d (generate(codes=d)), as sample.py --real-codes.

Both samplers run without guidance, at the head's --continuous-temperature. Beside each, the spread of the samples: the rms
per element of (sample - real c), against the rms of (real c - the codebook centre of d), the residual that d leaves.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import discon  # noqa: E402
import fid  # noqa: E402


def rms(x):
    return float(x.pow(2).mean().sqrt())


@torch.no_grad()
def teacher_forced(model, c, d, y, temperature, generator):
    """c (B, N, C) where each c_i is drawn given the real c of every other position, d and y."""
    continuous = model.continuous
    B, N, C = c.shape
    out = torch.empty_like(c)
    for i in range(N):
        known = torch.ones(B, N, dtype=torch.bool)
        known[:, i] = False
        h = continuous.transformer(continuous.embed(y, c, d, known))[:, continuous.cfg.class_tokens + i]  # (B, D)
        out[:, i] = continuous.sample_latent(h, 1.0, temperature, model.cfg.diffusion_steps, generator=generator)
    return out


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a stage-2 checkpoint of a discon-mode model")
    parser.add_argument("reference", help="FID reference statistics .npz")
    parser.add_argument("--weights", default=None, help="Inception weights for fid.py (None: its download)")
    parser.add_argument("--noise", default="0,0.1,0.2,0.4", help="comma-separated latent noise scales s")
    parser.add_argument("--continuous-temperature", type=float, default=None, help="the head's (default: the config's)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--rows", default="noise,codes,teacher,free", help="which rows to score")
    args = parser.parse_args()
    ckpt, model = data.load_checkpoint(args.checkpoint, stage=2)
    model.eval()
    temperature = model.cfg.continuous_temperature if args.continuous_temperature is None else \
        args.continuous_temperature
    inception = fid.load_inception(args.weights, "cpu")
    reference = fid.load_statistics(args.reference)
    judge = data.shape_judge(model.tokenizer.cfg.image_size, cache_dir=os.path.dirname(os.path.abspath(args.checkpoint)))
    images, labels = data.training_images(ckpt["config"], args.num_images)
    x = data.to_model_input(images, "cpu", model.tokenizer.cfg.image_size)
    c_grid, d_grid = model.tokenizer.encode(x)
    c, d = model.tokens((c_grid, d_grid))                                                    # (B, N, C), (B, N)
    y = torch.as_tensor(labels, dtype=torch.long)
    g = model.tokenizer.cfg.grid_size
    centre = model.tokenizer.codebook(d)                                                      # raw latents
    tok = model.tokenizer
    centre = (centre - tok.latent_mean) / tok.latent_std                                     # normalised, as c
    generator = torch.Generator().manual_seed(0)

    def score(name, grid=None, decoded=None, spread=None):
        if decoded is None:
            decoded = torch.cat([tok.decode(part) for part in grid.split(250)])
        uint8 = discon.to_uint8(decoded).permute(0, 2, 3, 1).numpy()
        accuracy, _ = data.class_accuracy(judge, uint8, labels)
        value = fid.fid_from_images(uint8, reference, model=inception)
        extra = f" | {spread:.3f}" if spread is not None else " | -"
        print(f"| {name} | {100 * accuracy:.1f} | {value:.1f}{extra} |", flush=True)

    def as_grid(tokens):  # (B, N, C) -> (B, C, g, g)
        return tokens.transpose(1, 2).reshape(len(tokens), -1, g, g)

    print(f"{args.checkpoint}, {len(images)} training images, head temperature {temperature}; "
          f"rms of the residual c - centre(d): {rms(c - centre):.3f}\n")
    print("| images | class accuracy (%) | FID | rms(sample - c) |")
    print("|---|---|---|---|")
    rows = args.rows.split(",")
    if "noise" in rows:
        for s in map(float, args.noise.split(",")):
            noisy = c + s * torch.randn(c.shape, generator=generator)
            score(f"decode(c + {s:g} N(0, 1))", as_grid(noisy), spread=rms(noisy - c))
    if "codes" in rows:
        decoded = torch.cat([tok.decode_codes(part) for part in d_grid.split(250)])
        score("decode_codes(d)", decoded=decoded, spread=rms(centre - c))
    if "teacher" in rows:
        forced = torch.cat([teacher_forced(model, c[i:i + 250], d[i:i + 250], y[i:i + 250], temperature, generator)
                            for i in range(0, len(c), 250)])
        score("teacher-forced c_i given the real rest", as_grid(forced), spread=rms(forced - c))
    if "free" in rows:
        free = []
        for i in range(0, len(c), 250):
            free.append(model.continuous.sample(y[i:i + 250], d[i:i + 250], 1.0, temperature, model.cfg.sampling_steps,
                                                model.cfg.diffusion_steps, generator))
        free = torch.cat(free)
        score(f"free-running, {model.cfg.sampling_steps} sampling steps", as_grid(free), spread=rms(free - c))


if __name__ == "__main__":
    main()
