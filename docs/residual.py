"""Does DisCon's continuous stage learn what the discrete token leaves out? (docs/experiments.md, "Where it breaks")

    python docs/residual.py out/model.pt [--temperature 0.6]

On 500 fresh shapes (seed 5; training uses seed 0), every continuous token c_i is predicted teacher-forced: the
transformer sees the true class, the true discrete grid d and the true c_1 .. c_{i-1}, as in training, and the
diffusion head samples c_i from its output (no guidance) several times. Printed: the mean squared error per channel of
normalised c against the real c, for the codebook centre of d_i (what d alone says), one head sample, and the mean of
the samples (about the head's conditional mean, at temperature 1). A head that learnt the residual c - codebook[d_i]
has a mean closer to c than the centre is.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import discon  # noqa: E402
import train  # noqa: E402


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a discon-mode model.pt of train.py, trained on shapes")
    parser.add_argument("--samples", type=int, default=8, help="head samples per token")
    parser.add_argument("--temperature", type=float, default=1.0, help="> 0: scales the head's sampling noise")
    args = parser.parse_args()
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    ckpt = torch.load(args.checkpoint, map_location="cpu")
    model = discon.build_model(ckpt["config"]["tokenizer"], ckpt["config"]["model"])
    model.load_state_dict(ckpt["ema"])
    model.eval()
    if model.cfg.mode != "discon":
        sys.exit(f"{args.checkpoint} is a {model.cfg.mode}-mode model; this measures discon mode")
    images, labels = train.make_shapes(500, model.tokenizer.cfg.image_size, seed=5)
    x, y = train.to_model_input(images, "cpu", model.tokenizer.cfg.image_size), torch.from_numpy(labels)
    tokenizer = model.tokenizer
    c, d = model.tokens(tokenizer.encode(x))                                        # (B, N, C), (B, N)
    centre = (tokenizer.codebook.weight[d] - tokenizer.latent_mean) / tokenizer.latent_std   # (B, N, C)
    z = model.transformer(model.embed(y, c, d))[:, model.n_discrete:]               # the outputs that predict c_1 ..
    B, N, C = c.shape
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([model.sample_latent(z.reshape(B * N, -1), 1.0, args.temperature, None, generator)
                           for _ in range(args.samples)]).view(args.samples, B, N, C)

    def mse(prediction):
        return (prediction - c).pow(2).mean().item()
    print(f"{args.checkpoint}, temperature {args.temperature}: mean squared error per channel of normalised c "
          f"(its mean square: {c.pow(2).mean():.3f})")
    print(f"  codebook centre of d_i       {mse(centre):.3f}")
    print(f"  one head sample              {mse(samples[0]):.3f}")
    print(f"  mean of {args.samples} head samples       {mse(samples.mean(0)):.3f}   (their spread: "
          f"{samples.var(0).mean():.3f})")


if __name__ == "__main__":
    main()
