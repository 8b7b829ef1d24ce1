"""A second dataset of real images that installs offline: scikit-learn's handwritten digits (UCI's optdigits, 1797
images of 8x8 pixels, 10 classes), as a folder for train.py's `--dataset folder`, and a judge of its samples' classes.
(docs/experiments.md, "The comparison on real images")

    pip install scikit-learn
    python docs/digits.py export data/digits        # data/digits/<class>/*.png and data/digits_heldout/<class>/*.png
    python train.py --dataset folder --data_dir data/digits --model_steps 1000 --out_dir runs/digits
    python sample.py runs/digits/model.pt --num-images 1000 --batch-size 500
    python docs/digits.py judge runs/digits/samples/samples_1000x32x32x3.npz

Stage 2 stops at 1000 steps: at the quick preset's 7000 the prior memorises these 1497 images (experiments.md).

The export keeps 300 images (30 per class, seeded) apart as the held-out split (data.py reads DIR_heldout). The judge
is an RBF support-vector classifier trained on the 1497 training digits at 8x8, applied to each sample averaged down to
8x8 grey: it scores the held-out digits, and real digits through train.py's 32x32 resize, about 99%.
"""
import os
import sys

import numpy as np
from PIL import Image


def digits():
    """(images uint8 (1797, 8, 8), labels, train index, held-out index): 30 held-out images per class, seeded."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = np.round(bunch.images * 255 / 16).astype(np.uint8)         # 0..16 -> 0..255, light digits on black
    order = np.random.default_rng(0).permutation(len(images))
    heldout = np.sort(np.concatenate([order[bunch.target[order] == k][:30] for k in range(10)]))
    return images, bunch.target, np.setdiff1d(np.arange(len(images)), heldout), heldout


def judge():
    from sklearn.svm import SVC
    images, labels, train, _ = digits()
    return SVC(gamma="scale").fit(images[train].reshape(len(train), -1) / 255, labels[train])


def to_8x8_grey(images):
    """uint8 (n, H, W, 3) -> float (n, 64) in [0, 1]: the mean of the channels, averaged over (H/8)x(W/8) blocks."""
    n, h, w, _ = images.shape
    return images.mean(3).reshape(n, 8, h // 8, 8, w // 8).mean((2, 4)).reshape(n, 64) / 255


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "judge"):
        sys.exit(__doc__)
    if sys.argv[1] == "export":
        images, labels, train, heldout = digits()
        for folder, index in ((sys.argv[2], train), (sys.argv[2].rstrip("/") + "_heldout", heldout)):
            for i in index:
                os.makedirs(os.path.join(folder, str(labels[i])), exist_ok=True)
                Image.fromarray(images[i]).convert("RGB").save(os.path.join(folder, str(labels[i]), f"{i:04d}.png"))
            print(f"wrote {len(index)} images into {folder}")
        return
    samples = np.load(sys.argv[2])
    predicted = judge().predict(to_8x8_grey(samples["arr_0"]))
    correct = predicted == samples["labels"]
    print(f"class accuracy {100 * correct.mean():.1f}% ({len(correct)} samples; per class: " + ", ".join(
        f"{k} {100 * correct[samples['labels'] == k].mean():.0f}%" for k in range(10)) + ")")


if __name__ == "__main__":
    main()
