"""Do the samples copy training images? (docs/experiments.md, "Held-out loss and memorisation")

    python docs/nearest.py out/model.pt out/samples/samples_1000x32x32x3.npz

For every sample, the distance to its nearest training image (RMS over pixels and channels, on a 0-1 scale); for as
many held-out real images as the split has (data.py's "heldout"), theirs. The ratio of the medians, samples over
held-out, is well below 1 when a model copies most of its samples; near 1 or above when it does not (samples worse
than real images lie farther from everything). Copies among bad samples show in the closest 1% instead: nearer a
training image than the closest held-out images come (the 7000-step digits model: 0.039 against 0.059 at a median
ratio of 1.95). Writes nearest.png beside the samples: the 10 samples closest to a training image, each beside it.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def nearest(queries, references, batch=500):
    """-> (distance, index) of the nearest reference (n, D) for each query (m, D), RMS per element."""
    refs = torch.from_numpy(references.reshape(len(references), -1)).float() / 255
    found = [torch.cdist(torch.from_numpy(q.reshape(len(q), -1)).float() / 255, refs).min(1)
             for q in np.array_split(queries, max(1, len(queries) // batch))]
    return torch.cat([f.values for f in found]).numpy() / refs.shape[1] ** 0.5, torch.cat([f.indices for f in found])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    config = data.read_or_fail(sys.argv[1], lambda p: torch.load(p, map_location="cpu"), "a checkpoint of train.py?")[
        "config"]
    samples = np.load(sys.argv[2])["arr_0"]
    train_images, _, _ = data.load_dataset(config["train"]["dataset"], config["train"]["data_dir"],
                                           config["tokenizer"]["image_size"])
    heldout = data.load_dataset(config["train"]["dataset"], config["train"]["data_dir"],
                                config["tokenizer"]["image_size"], "heldout")
    if heldout is None:
        sys.exit(f"the {config['train']['dataset']} dataset has no held-out split to compare with")
    real = heldout[0][data.balanced_subset(heldout[1], len(samples))]
    d_samples, index = nearest(samples, np.asarray(train_images))
    d_real, _ = nearest(real, np.asarray(train_images))
    print(f"nearest training image, median RMS distance (0-1 scale): {len(samples)} samples {np.median(d_samples):.4f}, "
          f"{len(real)} held-out real images {np.median(d_real):.4f}; ratio {np.median(d_samples) / np.median(d_real):.2f}")
    print(f"closest 1%: samples {np.quantile(d_samples, 0.01):.4f}, held-out {np.quantile(d_real, 0.01):.4f}")
    closest = np.argsort(d_samples)[:10]
    pairs = np.stack([samples[closest], np.asarray(train_images)[index[closest].numpy()]], 1).reshape(
        -1, *samples.shape[1:])
    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), "nearest.png")
    data.save_grid(pairs, 10, path)  # rows of 5 pairs: sample, its nearest training image
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
