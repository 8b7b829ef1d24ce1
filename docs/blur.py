"""How sharp must a reconstruction be for a given FID? (docs/experiments.md, "A sharper tokenizer")

    python docs/blur.py runs/shapes_stats.npz --weights $W

FID of 1000 fresh shapes (seed 3, the floor's images) against the reference statistics, after a Gaussian blur of each
standard deviation in pixels (`data.gaussian_blur`, radius 3 sigma, border replicated, rounded back to uint8). A
tokenizer whose reconstructions score an rFID of F is about as blurred as the sigma whose FID is F (rFID is measured
on training images, these are fresh ones; both score 7.3 unblurred).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import discon  # noqa: E402
import fid  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="statistics .npz of the training images (fid.py --save-stats), or images")
    parser.add_argument("--weights", default=None, help="Inception weights for fid.py (None: its download)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.5, 0.75, 1.0],
                        help="blur standard deviations in pixels; 0 is no blur")
    args = parser.parse_args()
    model = fid.load_inception(args.weights, fid.default_device())
    reference = fid.compute_statistics(args.reference, model)
    images = data.make_shapes(1000, 32, seed=3)[0]
    x = data.to_model_input(images, "cpu", 32)                                     # (N, 3, 32, 32) in [-1, 1]
    for sigma in args.sigmas:
        blurred = data.gaussian_blur(x, sigma, radius=math.ceil(3 * sigma)) if sigma > 0 else x
        score = fid.fid_from_images(discon.to_uint8(blurred).permute(0, 2, 3, 1).numpy(), reference, model=model,
                                    batch_size=100)
        print(f"sigma {sigma:.2f} px: FID {score:.1f}", flush=True)


if __name__ == "__main__":
    main()
