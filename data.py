"""What train.py and sample.py share, so that neither imports the other: processes, files and checkpoints; the datasets
(shapes, CIFAR-10, ImageNet-64, a folder of images); the shapes judge; and the training batches.

Every dataset is (images uint8 (num_images, H, W, 3), labels int64 (num_images,), num_classes), held in memory or
memory-mapped."""
import functools
import glob
import hashlib
import io
import math
import os
import pickle
import socket
import sys
import tarfile
import tempfile
import urllib.request
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import discon

# ----------------------------------------------------------------------------------------------------------------------
# Processes: a plain `python` run is rank 0 of 1 and calls no collective; under torchrun, RANK / LOCAL_RANK /
# WORLD_SIZE choose DDP. Rank 0 alone prints and writes.


def setup_distributed():
    """-> (rank, local_rank, world_size, device)."""
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cuDNN's default TF32 would give the float32 tokenizer other numbers on a GPU than on a CPU.
        torch.backends.cudnn.allow_tf32 = False
    if world > 1:  # a long timeout: the one-time ImageNet-64 conversion runs while the others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return rank, local_rank, max(world, 1), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args))  # keeps the progress bar intact


def progress(iterable=None, **kwargs):
    """A tqdm bar on rank 0 alone; without a terminal (a log file), one line a minute."""
    return tqdm(iterable, disable=int(os.environ.get("RANK", 0)) != 0, dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 60, **kwargs)


def fail(message):
    """Exit non-zero with a one-line message, printed by the local rank 0 of each node, with its place when there
    are several processes: an error that only another node meets is not lost, and none prints twice."""
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if local_rank != 0:
        sys.exit(1)
    sys.exit(f"[rank {rank} of {world}, {socket.gethostname()}] {message}" if world > 1 else message)


def derived_seed(*keys):
    """A seed that is a pure function of non-negative integers, e.g. (seed, stage, step, rank): what is drawn from it
    needs no state in a checkpoint, so a resumed run draws what an uninterrupted one would have."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------------------
# Files: every output is written atomically; every file a user hands in is read with a one-line error.


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, fsync, then rename over it (atomic on POSIX): a crash or a kill
    mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique when nodes share the directory
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def writable_or_fail(directory, clean=False):
    """Create `directory` and check that it takes a file, so that an output fails before the work. clean=True also
    removes the temporary files that a killed atomic_write leaves."""
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        fail(f"cannot write into {directory}: {e.strerror or e}")
    for tmp in glob.glob(os.path.join(glob.escape(directory), "*.tmp.*")) if clean else []:
        print0(f"removing {tmp}, left by a killed run")
        os.remove(tmp)


def read_or_fail(path, read, hint):
    """read(path), or fail() naming the file: a missing, truncated or foreign file is the user's to fix."""
    try:
        return read(path)
    except Exception as e:  # unpickling, unzipping and torch.load raise anything from EOFError to RuntimeError
        fail(f"cannot read {path} ({type(e).__name__}: {e}); {hint}")


def load_checkpoint(path, stage=None, weights="ema"):
    """-> (the checkpoint dict of train.py, of `stage` 1 or 2 if given; the Tokenizer (stage 1) or DisCon model
    (stage 2) built from its config, holding its `weights`: "ema" or "model", the raw ones), or fail() in one line."""
    ckpt = read_or_fail(path, lambda p: torch.load(p, map_location="cpu"), "is it a complete checkpoint of train.py?")
    if not isinstance(ckpt, dict) or ckpt.get("stage") not in ((stage,) if stage else (1, 2)):
        fail(f"{path} is not {({1: 'a tokenizer.pt', 2: 'a model.pt'}).get(stage, 'a checkpoint')} of train.py")
    try:
        tokenizer = discon.Tokenizer(discon.TokenizerConfig(**ckpt["config"]["tokenizer"]))
        module = tokenizer if ckpt["stage"] == 1 else discon.DisCon(discon.DisConConfig(**ckpt["config"]["model"]),
                                                                     tokenizer)
        module.load_state_dict(ckpt[weights])
    except (TypeError, KeyError, RuntimeError) as e:  # a field or weight that this version does not have
        fail(f"{path} was written by another version of this code ({type(e).__name__}: "
             f"{str(e).strip().splitlines()[-1].strip()[:200]}): train it again")
    return ckpt, module


def save_grid(images, ncol, path):
    """uint8 images (n, H, W, 3) -> one PNG, ncol per row, with 2-pixel white gaps."""
    n, h, w, _ = images.shape
    nrow, pad = -(-n // ncol), 2
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------------
# Datasets

SHAPES = {  # class name -> inside-test in shape coordinates (u, v): centre 0, radius 1, v grows downwards
    "circle": lambda u, v: u * u + v * v < 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,
    "triangle": lambda u, v: (v < 0.7) & (abs(u) < 0.6 * (v + 0.9)),
    "cross": lambda u, v: ((abs(u - v) < 0.35) | (abs(u + v) < 0.35)) & (np.maximum(abs(u), abs(v)) < 0.85),
    "ring": lambda u, v: (u * u + v * v < 1) & (u * u + v * v > 0.4),
    "diamond": lambda u, v: abs(u) + abs(v) < 1,
    "horizontal bar": lambda u, v: (abs(u) < 1) & (abs(v) < 0.35),
    "vertical bar": lambda u, v: (abs(u) < 0.35) & (abs(v) < 1),
    "plus": lambda u, v: ((abs(u) < 0.3) | (abs(v) < 0.3)) & (np.maximum(abs(u), abs(v)) < 1),
    "half-disc": lambda u, v: (u * u + (v + 0.4) ** 2 < 1) & (v > -0.4),
}
SHAPES_SEED, JUDGE_SEED, HELDOUT_SEED = 0, 1, 2  # the training images', the judge's, and the held-out images' seeds
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def make_shapes(n, size, seed):
    """The built-in dataset, a pure function of (n, size, seed): class k is the k-th of SHAPES at a random size, place
    and colour, light on a dark two-colour gradient or the reverse; masks on a 4x finer grid, averaged down
    (antialiased edges)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    radius = rng.uniform(0.2, 0.4, n).astype(np.float32)                    # fraction of the image side
    cx, cy = (rng.uniform(radius, 1 - radius).astype(np.float32) for _ in range(2))
    fg = rng.uniform(0, 1, (n, 3))
    light = fg.mean(1, keepdims=True) > 0.5
    bg0 = np.where(light, rng.uniform(0, 0.35, (n, 3)), rng.uniform(0.65, 1, (n, 3)))
    bg1 = np.clip(bg0 + rng.uniform(-0.2, 0.2, (n, 3)), 0, 1)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))                            # direction of the gradient
    fine = ((np.arange(4 * size) + 0.5) / (4 * size)).astype(np.float32)    # pixel centres of the 4x grid in [0, 1]
    offset = (np.arange(size) + 0.5) / size - 0.5                           # pixel centres, from the image centre
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, 256):  # in chunks, so that the 4x masks stay in cache
        i = slice(start, start + 256)
        u = (fine[None, None, :] - cx[i, None, None]) / radius[i, None, None]  # (b, 1, 4s)
        v = (fine[None, :, None] - cy[i, None, None]) / radius[i, None, None]  # (b, 4s, 1)
        mask = np.zeros((len(u), 4 * size, 4 * size), np.float32)
        for k, inside in enumerate(SHAPES.values()):
            mask[labels[i] == k] = inside(u[labels[i] == k], v[labels[i] == k])
        alpha = mask.reshape(-1, size, 4, size, 4).mean((2, 4))[..., None]     # (b, s, s, 1) coverage
        t = 0.5 + offset[None, None, :] * np.cos(angle[i]) + offset[None, :, None] * np.sin(angle[i])
        t = np.clip(t, 0, 1)[..., None]                                        # (b, s, s, 1) position on the gradient
        background = bg0[i, None, None] * (1 - t) + bg1[i, None, None] * t
        images[i] = (background * (1 - alpha) + fg[i, None, None] * alpha) * 255 + 0.5
    return images, labels


def prepare_data(name, data_dir, image_size):
    """One-time work, by one process per node while the others wait: download CIFAR-10, or convert ImageNet-64 or an
    image folder (and its DIR_heldout, if any) into one uint8 .npy each that every process memory-maps (a node's
    processes share one copy in RAM)."""
    if name == "cifar10" and not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        try:
            with urllib.request.urlopen(CIFAR_URL, timeout=60) as response:
                archive = response.read()  # 170 MB, extracted from memory
        except OSError as e:
            fail(f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py and downloading it failed ({e}).\n"
                 f"Download {CIFAR_URL} and extract it into {data_dir}/ (giving {data_dir}/cifar-10-batches-py/).")
        if hashlib.md5(archive).hexdigest() != CIFAR_MD5:
            fail(f"the download of {CIFAR_URL} does not have the MD5 {CIFAR_MD5} of the official archive; retry")
        writable_or_fail(data_dir)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # tar filters: Python 3.12+, some 3.8-3.11 patches
            tar.extractall(data_dir, **{"filter": "data"} if hasattr(tarfile, "data_filter") else {})
    if name == "imagenet64":
        convert(name, data_dir, image_size)
    if name == "folder":
        heldout = data_dir.rstrip("/") + "_heldout"
        for folder in [data_dir] + ([heldout] if os.path.isdir(heldout) else []):
            convert(name, folder, image_size, classes_from=data_dir)


def convert(name, data_dir, image_size, classes_from=None):
    """ImageNet-64's batches, or a folder's images, into one .npy of images and one of labels (converted_paths)."""
    images_path, labels_path, files, _ = converted_paths(name, data_dir, image_size, classes_from)
    if os.path.exists(images_path):  # written last: its presence means that the conversion is complete
        return
    if not files:
        fail(f"no ImageNet 64x64 files in {data_dir}: put the official downsampled ImageNet training files there "
             f"(Imagenet64_train_part*.zip from image-net.org, unzipped: train_data_batch_1.npz .. 10.npz)")
    writable_or_fail(data_dir)
    if name == "imagenet64":  # the official batches: ~15 GB of zipped (n, 12288) flattened CHW arrays
        read = lambda path, key: read_or_fail(path, lambda p: np.load(p)[key], "unzip the official files again")
        labels = np.concatenate([read(p, "labels") for p in files]).astype(np.int64) - 1  # they count from 1
        size, images = 64, (read(p, "data").reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1) for p in files)
    else:  # centre crop to a square, then resize; unreadable files are reported and skipped
        size, images, labels = image_size, [], []
        for path, k in files:
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.BICUBIC)))
                labels.append(k)
            except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError... for damaged or foreign files
                print0(f"skipping {path}: {e}")
        if not images:
            fail(f"no readable images in the class sub-directories of {data_dir}")
        labels = np.asarray(labels, np.int64)
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(labels), size, size, 3)}

    def write_images(f):  # the .npy header, then the images: ImageNet-64 one batch at a time, never all in memory
        np.lib.format.write_array_header_1_0(f, header)
        for part in images:
            f.write(part.tobytes())
    atomic_write(labels_path, lambda f: np.save(f, labels))
    atomic_write(images_path, write_images)


def converted_paths(name, data_dir, image_size, classes_from=None):
    """-> (images .npy, labels .npy, source files, number of classes) of ImageNet-64, or of a folder with one
    sub-directory of images per class (hidden entries such as .ipynb_checkpoints are skipped), the classes numbered as
    classes_from's (the training folder, for a held-out one). A folder's .npy are named after a hash of its file list:
    adding, removing or changing an image converts it anew."""
    if name == "imagenet64":
        files = sorted(glob.glob(os.path.join(data_dir, "train_data_batch_*.npz")),
                       key=lambda p: int(p[:-4].split("_")[-1]))  # batch 10 after batch 9, not after batch 1
        base = os.path.join(data_dir, "imagenet64_train_")
        return base + "images.npy", base + "labels.npy", files, 1000
    if not os.path.isdir(data_dir):
        fail(f"--data_dir {data_dir} is not a directory (the folder dataset wants one sub-directory per class)")
    subdirs = lambda folder: sorted(d for d in os.listdir(folder) if d[0] != "." and os.path.isdir(
        os.path.join(folder, d)))
    classes = subdirs(classes_from or data_dir)
    if set(subdirs(data_dir)) - set(classes):
        fail(f"{data_dir} has classes that {classes_from} has not: {sorted(set(subdirs(data_dir)) - set(classes))}")
    files = [(os.path.join(data_dir, c, f), k) for k, c in enumerate(classes) if c in subdirs(data_dir)
             for f in sorted(os.listdir(os.path.join(data_dir, c))) if f[0] != "." and f.lower().endswith(
                 IMAGE_EXTENSIONS)]
    if not files:
        fail(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in the class sub-directories of {data_dir}")
    key = hashlib.sha1(repr([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f, _ in files]).encode()).hexdigest()
    base = os.path.join(data_dir, f".discon_{image_size}px_{key[:12]}_")
    return base + "images.npy", base + "labels.npy", files, len(classes)


def load_dataset(name, data_dir, image_size, split="train"):
    """-> (images uint8 (num_images, H, W, 3), labels int64 (num_images,), num_classes), after prepare_data. The
    "heldout" split, images that training never sees: CIFAR-10's test batch, 2000 shapes of their own seed, or a
    folder's sibling DIR_heldout; None for ImageNet-64, or for a folder without one."""
    if name == "shapes":
        return (*make_shapes(20_000 if split == "train" else 2000, image_size,
                             SHAPES_SEED if split == "train" else HELDOUT_SEED), len(SHAPES))
    classes_from = None
    if split != "train" and name == "folder":
        data_dir, classes_from = data_dir.rstrip("/") + "_heldout", data_dir
        if not os.path.isdir(data_dir):
            return None
    elif split != "train" and name != "cifar10":
        return None
    if name == "cifar10":
        def read(path):  # (n, 3072) flattened CHW -> (n, 32, 32, 3)
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[b"labels"], np.int64)
        folder = os.path.join(data_dir, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        batches = [read_or_fail(os.path.join(folder, f), read, f"delete {folder} to download it again") for f in files]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), 10
    images_path, labels_path, _, num_classes = converted_paths(name, data_dir, image_size, classes_from)
    if name == "folder" and not os.path.exists(images_path):
        convert(name, data_dir, image_size, classes_from)
    return np.load(images_path, mmap_mode="r"), np.load(labels_path), num_classes


def balanced_subset(labels, n, seed=0):
    """Sorted indices of n images, as many of each class as the data allow, drawn with a seeded shuffle: "the first n
    images" of a dataset sorted by class (a folder, ImageNet) would be one class."""
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]                       # classes in turn, each shuffled
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])  # of each image within its class
    return np.sort(order[np.argsort(rank, kind="stable")[:n]])  # the first of every class, then the second, ...


def training_images(config, n):
    """n training images of the dataset of a checkpoint's config, a seeded class-balanced subset, and their labels."""
    images, labels, _ = load_dataset(config["train"]["dataset"], config["train"]["data_dir"],
                                     config["tokenizer"]["image_size"])
    subset = balanced_subset(labels, n)
    return images[subset], labels[subset]


# ----------------------------------------------------------------------------------------------------------------------
# The shapes judge: since shapes are drawn by code, we know what each sample should show. A small CNN trained on shapes
# of a seed that training never uses tells the ten classes apart; the class accuracy of class-conditional samples (the
# fraction it assigns to the class they were sampled for) says whether a model learnt the shapes, which FID at a few
# thousand samples hardly does. About 10 s on 2 CPU cores, then cached.


def gaussian_blur(x, sigma, radius=2):
    """Blur images (B, 3, H, W) with a (2 radius + 1)^2 Gaussian kernel, replicating the border."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel.expand(3, 1, 2 * radius + 1, 2 * radius + 1),
                    groups=3)


def shape_judge(image_size, cache_dir=None, steps=400, batch=128, lr=3e-3):
    """The judge for shapes of this size: loaded from cache_dir/shape_judge_{size}.pt, or trained (and cached there),
    without moving the caller's random state."""
    path = cache_dir and os.path.join(cache_dir, f"shape_judge_{image_size}.pt")
    with torch.random.fork_rng():
        torch.manual_seed(JUDGE_SEED)
        w = 16
        judge = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                              nn.Flatten(), nn.Linear(4 * w, len(SHAPES)))
    if path and os.path.exists(path):
        judge.load_state_dict(torch.load(path, map_location="cpu"))
        return judge.eval()
    images, labels = make_shapes(10_000, image_size, JUDGE_SEED)
    x, y = to_model_input(images, "cpu", image_size), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(JUDGE_SEED)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        i = torch.randint(0, len(x), (batch,), generator=generator)
        # Decoded images are a little blurred: a blurred copy mixed into each image keeps them recognisable.
        mix = torch.rand(batch, 1, 1, 1, generator=generator)
        with torch.enable_grad():  # callers may run under no_grad
            loss = F.cross_entropy(judge((1 - mix) * x[i] + mix * gaussian_blur(x[i], sigma=1.5)), y[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if path:
        atomic_write(path, lambda f: torch.save(judge.state_dict(), f))
    return judge.eval()


@torch.no_grad()
def class_accuracy(judge, images, labels):
    """uint8 images (n, H, W, 3) sampled for labels (n,) -> (overall accuracy, {class name: accuracy})."""
    x = to_model_input(images, "cpu", images.shape[1])
    predicted = torch.cat([judge(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()
    labels = np.asarray(labels)
    correct = predicted == labels
    return float(correct.mean()), {name: float(correct[labels == k].mean()) for k, name in enumerate(SHAPES)
                                   if (labels == k).any()}


# ----------------------------------------------------------------------------------------------------------------------
# Batches


def to_device(array, device):
    """numpy -> torch on the device; on CUDA from pinned memory, without waiting for the copy."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    return x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)


def to_model_input(images, device, image_size):
    """uint8 (B, H, W, 3) -> float (B, 3, image_size, image_size) in [-1, 1] on the device."""
    x = to_device(images, device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != image_size:  # e.g. ImageNet-64 trained at 32x32
        x = F.interpolate(x, size=image_size, mode="bicubic", antialias=True).clamp(-1, 1)
    return x


def model_inputs(images, index, device, image_size, batch=250):
    """to_model_input of images[index], `batch` at a time."""
    return (to_model_input(images[index[i:i + batch]], device, image_size) for i in range(0, len(index), batch))


@functools.lru_cache(maxsize=1)
def permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(dataset, position, batch_size, seed, rank, world, device, image_size, latents=None):
    """This process's share of the global batch at data position (epoch, index) of the epoch's permutation, a pure
    function of (seed, epoch) -> (x, y, next position). Mirror flips are drawn for the whole global batch: what a step
    sees does not depend on the number of processes. x: images, or with encode_dataset's latents a (c, d) pair."""
    images, labels, _ = dataset
    epoch, index = position
    if index + batch_size > len(labels):  # drop the last partial batch of an epoch
        epoch, index = epoch + 1, 0
    order = permutation(seed, epoch, len(labels))[index:index + batch_size]
    flip = np.random.default_rng([seed, epoch, index]).random(batch_size) < 0.5
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    if latents is not None:
        i, f = to_device(order[mine], device), to_device(flip[mine].astype(np.int64), device)
        x = (latents[0][f, i], latents[1][f, i])
    else:
        x = to_model_input(images[order[mine]], device, image_size)
        x = torch.where(to_device(flip[mine], device)[:, None, None, None], x.flip(3), x)
    return x, to_device(labels[order[mine]], device), (epoch, index + batch_size)


@torch.no_grad()
def encode_dataset(tokenizer, images, device, image_size, batch=250):
    """(c, d) of every image, [0], and of its mirror image, [1]: stage 2's inputs, encoded once for all its steps.
    -> c (2, num_images, C, h, w) and d (2, num_images, h, w) on the device."""
    parts = []
    for i in progress(range(0, len(images), batch), desc="encoding the dataset"):
        x = to_model_input(images[i:i + batch], device, image_size)
        parts.append((tokenizer.encode(x), tokenizer.encode(x.flip(3))))
    return tuple(torch.stack([torch.cat([p[flip][k] for p in parts]) for flip in (0, 1)]) for k in (0, 1))
