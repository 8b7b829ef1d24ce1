"""How sharp must a reconstruction be for a given FID? (docs/experiments.md, "A sharper tokenizer")

    python docs/blur.py runs/shapes_stats.npz --weights $W

FID of 1000 fresh shapes (seed 3, the floor's images) against the reference statistics, after a Gaussian blur of each
standard deviation in pixels (separable 7-tap kernel, edges replicated, rounded back to uint8). A tokenizer whose
reconstructions score an rFID of F is about as blurred as the sigma whose FID is F.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
import train  # noqa: E402


def gaussian_blur(images, sigma):
    """uint8 images (N, H, W, 3) -> the same blurred with std `sigma` pixels, one axis at a time."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()                      # (N, 3, H, W)
    taps = torch.arange(-3, 4, dtype=torch.float64)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)                            # (3, 1, 1, 7): one per channel
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), kernel, groups=3)                      # along W
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), kernel.transpose(2, 3), groups=3)      # along H
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="statistics .npz of the training images (fid.py --save-stats)")
    parser.add_argument("--weights", default=None, help="Inception weights for fid.py (None: its download)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    images = train.make_shapes(1000, 32, seed=3)[0]
    model = fid.load_inception(args.weights, "cpu")
    reference = fid.load_statistics(args.reference)
    for sigma in args.sigmas:
        blurred = gaussian_blur(images, sigma) if sigma > 0 else images
        print(f"sigma {sigma:.2f} px: FID {fid.fid_from_images(blurred, reference, model=model, batch_size=100):.1f}",
              flush=True)


if __name__ == "__main__":
    main()
