"""What bf16 does to the diffusion head's eps (docs/experiments.md, "The diffusion head in bf16")

    python docs/bf16_head.py runs/masked_s0/model.pt

The conditions are a trained model's own: the transformer outputs (in float32) at the masked positions of 500 training
images, 85% of each grid masked, as in training. At each timestep t, x_t = q_sample(c, t, noise) for the true latents c
of those positions, and the head predicts eps twice: in float32, and under bf16 autocast (sample_latent's
head_autocast). It prints the float32 head's own error (against the true noise), the bf16 rounding (against the float32
head), and what the rounding becomes in the step's estimate of x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): the eps
error times sqrt(1 / abar - 1), before the sampler's clamp at clip_latent.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import discon  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def rms(x):
    return float(x.pow(2).mean().sqrt())


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a stage-2 checkpoint of a discon-mode model")
    parser.add_argument("--timesteps", default="10,100,500,900,999", help="comma-separated timesteps")
    args = parser.parse_args()
    ckpt = train.load_checkpoint(args.checkpoint, stage=2)
    model = discon.build_model(ckpt["config"]["tokenizer"], ckpt["config"]["model"])
    train.load_weights(model, ckpt["ema"], args.checkpoint)
    model.eval()
    images, labels = sample.training_images(ckpt, 500)
    c, d = model.tokens(train.to_model_input(images, "cpu", model.tokenizer.cfg.image_size))
    y = torch.as_tensor(labels, dtype=torch.long)
    continuous, g = model.continuous, torch.Generator().manual_seed(0)
    B, N, C = c.shape
    hidden = torch.rand(B, N, generator=g).argsort(1)[:, :math.ceil(0.85 * N)]
    known = torch.ones(B, N, dtype=torch.bool).scatter(1, hidden, False)
    h = continuous.transformer(continuous.embed(y, c, d, known))[:, 1:]
    z = h.gather(1, hidden[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)
    target = c.gather(1, hidden[..., None].expand(-1, -1, C)).flatten(0, 1)
    head, diffusion = continuous.diffusion_head, continuous.diffusion
    print(f"{len(z)} conditions of {args.checkpoint}\n")
    print("| t | sqrt(1/abar - 1) | float32 head vs true eps (rms) | bf16 vs float32 eps (rms) | relative | "
          "bf16 error in x0 (rms) |")
    print("|---|---|---|---|---|---|")
    for t in map(int, args.timesteps.split(",")):
        steps = torch.full((len(z),), t)
        noise = torch.randn(target.shape, generator=g)
        x_t = diffusion.q_sample(target, steps, noise)
        eps32 = head(x_t, steps, z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps16 = head(x_t, steps, z).float()
        gain = math.sqrt(1 / float(diffusion.alphas_cumprod[t]) - 1)
        error = rms(eps16 - eps32)
        print(f"| {t} | {gain:.3g} | {rms(eps32 - noise):.4f} | {error:.4f} | {error / rms(eps32):.2%} | "
              f"{error * gain:.3g} |")


if __name__ == "__main__":
    main()
