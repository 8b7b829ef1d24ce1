"""DisCon: discrete tokens as conditions for continuous autoregressive image generation, in one file.

A reference implementation of Zheng et al., "Rethinking Discrete Tokens: Treating Them as Conditions for Continuous
Autoregressive Image Synthesis" (arXiv 2507.01756, ICCV 2025). An image has two views of one latent grid: the discrete
VQ index grid d and the continuous latent grid c. DisCon samples d from a discrete autoregressive prior, then c from a
masked continuous model conditioned on d, and decodes only c:

    p(c | y) = sum_d p(d | y) p(c | d, y)            y = class label

The file reads like the method: configs, tokenizer (c and d of one grid), Gaussian diffusion, diffusion head (p(c_i | .)
per token), transformer, discrete prior p(d | y) (LlamaGen-like, causal), continuous model p(c | d, y) (MAR-like,
bidirectional, random order), DisCon (the two together). README.md lists every difference from the paper and why; the
one that shapes this file: one tokenizer gives both views (the paper pairs VA-VAE with MaskGIT's VQGAN).
"""
import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MODES = ("discon", "continuous", "discrete")
# The DisConConfig fields that only sampling reads: a resumed training run may change them.
SAMPLING_FIELDS = ("sampling_steps", "diffusion_steps", "guidance", "guidance_continuous", "temperature",
                   "temperature_continuous", "clip_latent", "head_autocast")

# ----------------------------------------------------------------------------------------------------------------------
# Configs. Every hyper-parameter lives here; asdict(config) is saved in each checkpoint and rebuilds the model alone.


@dataclass
class TokenizerConfig:
    image_size: int = 32               # CIFAR-10 and the built-in shapes dataset are 32x32
    in_channels: int = 3
    base_channels: int = 64            # chosen here: the smallest width that reconstructs 32x32 images well
    downsample: int = 4                # 32x32 -> 8x8 grid, N = 64 tokens (the paper: 256 -> 16x16, N = 256)
    latent_channels: int = 8           # C; chosen here (VA-VAE uses 32 at 16x16; our grids are tiny)
    codebook_size: int = 512           # K; chosen here (MaskGIT's VQGAN has 1024 codes for 256 tokens per image)
    kl_weight: float = 1e-4            # chosen here: small, so the KL only keeps c bounded and smooth (LDM-style)
    commitment_weight: float = 0.25    # beta of VQ-VAE (van den Oord et al. 2017), also LlamaGen's
    dead_code_threshold: float = 0.1   # a code used less than once per 10 batches (usage EMA) is restarted
    usage_decay: float = 0.99          # EMA decay of per-code usage counts
    decoder_noise: float = 0.3         # in training the decoder also sees c + this * std(c) * N(0, 1): it learns to
                                       # decode the continuous model's samples, which miss c by about 0.4 std. Chosen
                                       # on the quick preset: decode(c + 0.4 N(0, 1)) 138.5 -> 114.8 FID, decode(d)
                                       # 120.8 -> 114.4, decode(c)'s FID unchanged and its class accuracy 2 points
                                       # lower (docs/experiments.md)

    def __post_init__(self):
        check_fields(self, positive=("image_size", "in_channels", "base_channels", "latent_channels", "codebook_size"),
                     non_negative=("kl_weight", "commitment_weight", "dead_code_threshold", "decoder_noise"))
        if not 0 <= self.usage_decay < 1:
            raise ValueError(f"usage_decay must be in [0, 1), got {self.usage_decay}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):  # n & (n - 1) is 0 for powers of 2 only
            raise ValueError(f"downsample must be a power of 2 (4 or 8), got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")

    @property
    def grid_size(self):
        return self.image_size // self.downsample


@dataclass
class DisConConfig:
    mode: str = "discon"               # "discon" (the method), "continuous" (MAR-like) or "discrete" (LlamaGen-like)
    num_classes: int = 10
    n_layer: int = 4                   # transformer depth; each preset in train.py sets its own (quick: 2)
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0               # on the attention weights and the MLP's output (MAR: 0.1 on the attention
                                       # weights, the attention output and the MLP); 0 for the short CPU runs, where
                                       # the model sees each image a few times only; the cifar10 preset sets 0.1
    label_drop: float = 0.1            # classifier-free guidance: the prior drops the class, the continuous model
                                       # its whole condition (y and d), with this probability (MAR's, LlamaGen's 0.1)
    head_width: int = 256              # MAR's MLP head is 1024 wide and 6 deep for MAR-B (its README; 3 is the
    head_depth: int = 3                # default of its training script); scaled down here
    diffusion_batch_mul: int = 4       # MAR: each condition is trained on 4 (t, noise) pairs per step
    num_timesteps: int = 1000          # MAR / DDPM training steps
    # Sampling defaults (what generate and sample.py use unless told otherwise), measured in README.md:
    sampling_steps: int = 4            # K, the continuous model's steps, each revealing several tokens (MAR: 64
                                       # for 256 tokens); at most the N tokens of the grid. Quick preset, given real d:
                                       # K = 4, 8, 16 scored alike (docs/experiments.md), and 4 is the fastest
    diffusion_steps: int = 10          # respaced sampling steps: on the quick preset given real d, 10 scored as 25
                                       # and 50, 5 worse (docs/experiments.md); the GPU presets use MAR's 100
    guidance: float = 3.0              # classifier-free guidance scale of the discrete phase (on the logits) ...
    guidance_continuous: float = 1.0   # ... and of the continuous phase (on the head's eps, ramped up from 1 as the
                                       # tokens are revealed, MAR's linear schedule); 1 means none
    temperature: float = 0.6           # divides the discrete phase's logits ...
    temperature_continuous: float = 0.4  # ... and scales the diffusion head's sampling noise (MAR's temperature).
    # The quick preset's picks (docs/experiments.md): d guided and colder, c unguided and colder. On sampled d (one
    # model, --seed 1) they gained 7 points of class accuracy and 9 FID against temperature 1 on d and 0.6 on c;
    # guidance 3 on c costs 11 FID given real d.
    clip_latent: float = 5.0           # sampling clamps the predicted clean c to +-this (c has unit std per channel);
                                       # ADM's clip_denoised. Without it the first respaced step amplifies the head's
                                       # eps error several hundred times (abar_999 = 2e-9) and samples diverge.
    head_autocast: bool = True         # sampling runs the diffusion head's layers under the caller's autocast (bf16 on
                                       # a GPU), the chain's arithmetic in float32 all the same (False: the head in
                                       # float32 too). On the quick preset's 3 models under CPU bf16 autocast, it
                                       # moved FID by 0.08 at most, against a seed std of 3.1 (docs/experiments.md)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown: choose one of {', '.join(MODES)}")
        check_fields(self, positive=("num_classes", "n_layer", "n_head", "n_embd", "head_width", "head_depth",
                                     "diffusion_batch_mul", "num_timesteps", "sampling_steps", "diffusion_steps",
                                     "clip_latent"),
                     non_negative=("guidance", "guidance_continuous"))
        check_fields(self, positive=("temperature", "temperature_continuous"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_drop < 0.5:
            raise ValueError(f"label_drop must be in [0, 0.5), got {self.label_drop}")
        if self.diffusion_steps > self.num_timesteps:
            raise ValueError(f"diffusion_steps {self.diffusion_steps} is more than num_timesteps {self.num_timesteps}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


def check_fields(config, positive=(), non_negative=()):
    """ValueError for the first field of `config` named in `positive` that is not a finite number > 0, or in
    `non_negative` not one >= 0. Every message of the configs' checks starts with the field's name: train.py turns
    that name into the flag's (--n_layer, --tokenizer.codebook_size)."""
    for name in positive + non_negative:
        value = getattr(config, name)
        if not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            raise ValueError(f"{name} must be {'> 0' if name in positive else '>= 0'}, got {value}")


def to_uint8(x):
    """Images in [-1, 1], (B, 3, H, W) float -> (B, 3, H, W) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _distributed():
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: one conv encoder gives the continuous grid c; a VQ codebook over the same grid gives the discrete grid d,
# aligned with c position by position. One decoder decodes both views, so the information lost by quantization shows
# up as the gap between the two reconstructions (the paper's Figure 1 point).


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), without LDM's GroupNorm: see Tokenizer.__init__ for why."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(x))
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _widths(cfg):
    """Channel width at each resolution, doubling per downsampling step, capped at 4x (LDM's f=4 autoencoder: 1,2,4)."""
    levels = int(math.log2(cfg.downsample))
    return [cfg.base_channels * min(2 ** i, 4) for i in range(levels + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = _widths(cfg)
        layers = [nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)]
        for i in range(len(w) - 1):
            layers += [ResBlock(w[i], w[i + 1]), nn.Conv2d(w[i + 1], w[i + 1], 3, stride=2, padding=1)]
        layers += [ResBlock(w[-1], w[-1]), nn.SiLU()]
        layers += [nn.Conv2d(w[-1], 2 * cfg.latent_channels, 1)]  # posterior mean and log-variance
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = _widths(cfg)[::-1]
        layers = [nn.Conv2d(cfg.latent_channels, w[0], 3, padding=1), ResBlock(w[0], w[0])]
        for i in range(len(w) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i], w[i], 3, padding=1)]
            layers += [ResBlock(w[i], w[i + 1])]
        layers += [nn.SiLU(), nn.Conv2d(w[-1], cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def nearest_code(z, codes):
    """Index of the nearest code (K, C) for each row of z (M, C). The distances are computed in float32 even under
    autocast: rounded to bf16 they can make argmin pick a farther code, and training would then see other codes than
    encode() (float32 wherever it runs) gives at sampling."""
    with torch.autocast(z.device.type, enabled=False):
        z, codes = z.float(), codes.float()
        return (z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1)).argmin(1)   # (M,)


class Tokenizer(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> continuous grid c (B, C, h, w) and discrete grid d (B, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Colour is a per-image offset of the feature maps. GroupNorm (LDM's autoencoder) subtracts such offsets, and
        # PyTorch's default conv init shrinks the variance of every layer by 3, so the linear skip paths that could
        # carry colour fade through the encoder's dozen layers: the quick tokenizer reconstructed grey for 1250 of its
        # 1500 steps. Without normalisation (as VQ-VAE's encoder and decoder, van den Oord et al. 2017) and with a
        # variance-preserving init (std 1/sqrt(fan_in)) it learns colour within 100 steps (docs/experiments.md, "Why the
        # tokenizer was grey").
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.latent_channels)
        # Usage starts at zero, so the first training step restarts every code from encoder outputs (a data init).
        self.register_buffer("code_usage", torch.zeros(cfg.codebook_size))
        # Per-channel statistics of c over the training set (README.md), set by fit_latent_stats.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def check_images(self, x):
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}: "
                             f"resize the images to {cfg.image_size}x{cfg.image_size} or build a tokenizer for their "
                             f"size")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}: convert with x / 127.5 - 1")

    def quantize(self, z):
        """Nearest-code quantization of z (B, C, h, w) -> (straight-through quantized grid, d, VQ loss)."""
        B, C, h, w = z.shape
        d = nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C), self.codebook.weight)    # (B*h*w,)
        q = self.codebook(d).view(B, h, w, C).permute(0, 3, 1, 2)                        # (B, C, h, w)
        # VQ-VAE losses: the codebook term moves codes to the encoder outputs, the commitment term the other way.
        vq_loss = F.mse_loss(q, z.detach()) + self.cfg.commitment_weight * F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()  # straight-through: the forward value is q, the gradient goes to z unchanged
        return q_st, d.view(B, h, w), vq_loss

    @torch.no_grad()
    def restart_dead_codes(self, z, generator=None):
        """Move codes whose usage EMA fell below the threshold onto random encoder outputs of the whole batch (of every
        rank, gathered in rank order), so that the codebook does not depend on how the batch is split over ranks.
        Every code draws a candidate and only the dead ones take theirs: counting them would cost a host sync."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                             # (B*h*w, C)
        if _distributed():
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, flat.contiguous())
            flat = torch.cat(parts)
        pick = torch.randint(0, len(flat), (self.cfg.codebook_size,), generator=generator, device=flat.device)
        candidates = flat[pick].to(self.codebook.weight.dtype)                           # (K, C)
        if _distributed():
            dist.broadcast(candidates, src=0)  # every rank must hold the same codebook
        dead = self.code_usage < self.cfg.dead_code_threshold                            # (K,)
        self.codebook.weight.data.copy_(torch.where(dead[:, None], candidates, self.codebook.weight))
        # a restarted code gets a grace period before it can be declared dead again
        self.code_usage.copy_(torch.where(dead, torch.ones_like(self.code_usage), self.code_usage))

    @torch.no_grad()
    def update_usage(self, d):
        counts = torch.bincount(d.flatten(), minlength=self.cfg.codebook_size).float()
        if _distributed():
            dist.all_reduce(counts)  # the counts of the whole batch, as one process would count them
        self.code_usage.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return perplexity, (counts > 0).float().mean()

    def forward(self, x, generator=None):
        """Training loss of the tokenizer: a dict of named terms; "loss" is the one to backpropagate. The decoder
        reconstructs x from both views: c, a sample of the posterior plus decoder_noise times c's per-channel std
        of Gaussian noise, and d's codebook vectors."""
        self.check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:  # before the noise: its draws must not depend on how the batch is split over processes
            self.restart_dead_codes(mean, generator)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        c = mean + torch.exp(0.5 * logvar) * noise  # sampled posterior: the continuous view
        # The posterior's own noise is about 2% of c's std (the KL weight is small), far less than the continuous
        # model's sampling error: noise at the scale of c's per-channel std (over the batch) teaches the decoder that.
        # The std is over this process's micro-batch (512 values per channel for the quick preset's 32 images of 4x4
        # latents), so another split of the batch over processes changes it a little.
        if self.cfg.decoder_noise > 0:
            scale = mean.detach().std(dim=(0, 2, 3), keepdim=True, correction=0)             # (1, C, 1, 1)
            c = c + self.cfg.decoder_noise * scale * torch.randn(c.shape, generator=generator, device=c.device,
                                                                 dtype=c.dtype)
        q, d, vq_loss = self.quantize(mean)          # the discrete view of the same grid
        rec_c, rec_d = self.decoder(torch.cat([c, q])).chunk(2)
        # L1 reconstruction as LDM's autoencoder uses (without its perceptual and GAN terms: no pretrained nets here).
        terms = {
            "rec_continuous": (rec_c - x).abs().mean(),
            "rec_discrete": (rec_d - x).abs().mean(),
            "kl": 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean(),
            "vq": vq_loss,
        }
        terms["loss"] = terms["rec_continuous"] + terms["rec_discrete"] + self.cfg.kl_weight * terms["kl"] + vq_loss
        if self.training:
            terms["perplexity"], terms["usage"] = self.update_usage(d)
        return terms

    # Encoding and decoding run in the weights' precision (float32) even under autocast. Stage 2 without cached
    # latents encodes inside its bf16 training autocast, where bf16 convolutions gave an earlier quick tokenizer
    # (with GroupNorm) another d at 1.29% of positions and a c off by 0.005 RMS: other targets than the cached latents,
    # --real-codes and the latent statistics (all float32). Sampling decodes inside sample.py's autocast, where a bf16 decoder moved 18% of the
    # pixels by one level or more: GPU samples would not be the images a CPU decodes from the same c.

    def encoder_mean(self, x):
        """The posterior mean (B, C, h, w) of images x: the continuous view before its normalisation."""
        with torch.autocast(x.device.type, enabled=False):
            return self.encoder(x.to(self.codebook.weight.dtype))[:, : self.cfg.latent_channels]

    @torch.no_grad()
    def encode(self, x):
        """Images -> (c, d): c the normalised posterior mean (B, C, h, w), d its nearest codes (B, h, w)."""
        self.check_images(x)
        mean = self.encoder_mean(x)
        _, d, _ = self.quantize(mean)
        c = (mean - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)
        return c, d

    def decode(self, c):
        """Normalised continuous grid (B, C, h, w) -> images (B, 3, H, W), about [-1, 1]."""
        with torch.autocast(c.device.type, enabled=False):
            z = c.to(self.codebook.weight.dtype) * self.latent_std.view(1, -1, 1, 1)
            return self.decoder(z + self.latent_mean.view(1, -1, 1, 1))

    def decode_codes(self, d):
        """Discrete grid (B, h, w) -> images: the reconstruction from the quantized view."""
        with torch.autocast(d.device.type, enabled=False):
            return self.decoder(self.codebook(d).permute(0, 3, 1, 2))

    @torch.no_grad()
    def fit_latent_stats(self, batches):
        """Set latent_mean/latent_std to the per-channel statistics of c over an iterable of image batches."""
        total, total_sq, count = 0.0, 0.0, 0
        for x in batches:
            x = x.to(self.latent_mean.device)
            self.check_images(x)
            mean = self.encoder_mean(x).double()
            total = total + mean.sum((0, 2, 3))
            total_sq = total_sq + mean.pow(2).sum((0, 2, 3))
            count += mean.numel() // mean.shape[1]
        if count == 0:
            raise ValueError("fit_latent_stats got no batches")
        mu = total / count
        std = (total_sq / count - mu.pow(2)).clamp_min(1e-12).sqrt()
        self.latent_mean.copy_(mu)
        self.latent_std.copy_(std)
        return self.latent_mean.clone(), self.latent_std.clone()

    @torch.no_grad()
    def refit_codebook(self, batches, codebook_size, iterations=20, generator=None):
        """Replace the codebook by `codebook_size` k-means centres (Lloyd's algorithm) of the encoder means over an
        iterable of image batches: a discrete view of another size on the same frozen continuous view. Only c is
        decoded well afterwards (the decoder was trained on the old codes); README's codebook-size sweep uses it."""
        C = self.cfg.latent_channels
        z = torch.cat([self.encoder_mean(x.to(self.latent_mean.device)).permute(0, 2, 3, 1).reshape(-1, C)
                       for x in batches])                                                   # (M, C)
        if len(z) < codebook_size:
            raise ValueError(f"{len(z)} latent vectors cannot be fitted with {codebook_size} codes; give more images")
        pick = lambda n: z[torch.randperm(len(z), generator=generator, device=z.device)[:n]]
        centres = pick(codebook_size)
        for _ in range(iterations):
            assign = torch.cat([nearest_code(part, centres) for part in z.split(65536)])
            counts = torch.bincount(assign, minlength=codebook_size)[:, None]
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), pick(codebook_size))  # empty: reseed
        self.cfg = dataclasses.replace(self.cfg, codebook_size=codebook_size)
        self.codebook = nn.Embedding.from_pretrained(centres, freeze=False).requires_grad_(self.codebook.weight.requires_grad)
        self.code_usage = torch.ones(codebook_size, device=z.device)


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian diffusion over one token's C channels (DDPM, Ho et al. 2020): cosine schedule (Nichol & Dhariwal 2021),
# T = 1000, epsilon prediction, ancestral sampling on a respaced subset of steps. MAR learns the variance with an extra
# VLB term; this reference keeps it fixed at the posterior variance (improved DDPM's "fixed small"), which is simpler.


def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def classifier_free_guidance(cond, uncond, scale):
    """Ho & Salimans 2022: move from the unconditional prediction towards (and past, for scale > 1) the conditional."""
    return uncond + scale * (cond - uncond)


class GaussianDiffusion(nn.Module):
    """Holds no parameters; a module so that its q_sample tables follow the model to its device (no copy per step)."""

    def __init__(self, num_timesteps=1000):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.betas = cosine_betas(num_timesteps)                       # float64, on the CPU: the respaced chains
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)     # are computed from these
        self.register_buffer("sqrt_abar", self.alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1 - self.alphas_cumprod).sqrt().float(), persistent=False)
        self._chains = {}

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        def at(table):  # table[t], shaped to broadcast against x0 (M, ...)
            return table[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return at(self.sqrt_abar) * x0 + at(self.sqrt_one_minus_abar) * noise

    def loss(self, model, x0, cond, generator=None):
        """Epsilon-prediction MSE for x0 (M, C) under conditions cond (M, D), one random t per row."""
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, cond).float(), noise.float())

    def respaced(self, steps):
        """The chain of `steps` evenly spaced timesteps (improved DDPM's respacing), as float64 tables."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"diffusion steps must be in [1, {self.num_timesteps}], got {steps}")
        if steps not in self._chains:
            t = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().flip(0)  # always ends at T - 1
            abar = self.alphas_cumprod[t]
            abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            betas = 1 - abar / abar_prev
            var = betas * (1 - abar_prev) / (1 - abar)                   # posterior variance (beta tilde)
            self._chains[steps] = dict(
                timesteps=t,
                alphas_cumprod=abar,
                sqrt_recip_abar=(1 / abar).sqrt(),
                sqrt_recipm1_abar=(1 / abar - 1).sqrt(),
                coef_x0=betas * abar_prev.sqrt() / (1 - abar),           # posterior mean = coef_x0 x0 + coef_xt x_t
                coef_xt=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
                # variance at the last step is 0; its log is clipped to the next one's, as improved DDPM does
                log_var=torch.log(torch.cat([var[1:2], var[1:]])) if steps > 1 else torch.zeros(1, dtype=torch.float64),
            )
        return self._chains[steps]

    def noise(self, shape, steps, generator=None, device=None, dtype=torch.float32):
        """A chain's Gaussian draws (steps, *shape): x_T first, then the noise that each step but the last adds."""
        return torch.stack([torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(steps)])

    def sample(self, eps_fn, shape, steps, temperature=1.0, generator=None, device=None, dtype=torch.float32,
               clip_x0=None, noise=None):
        """Ancestral sampling from N(0, I) with eps_fn(x_t, t) -> eps; the added noise is scaled by temperature (MAR).
        clip_x0 clamps each step's estimate of x0, which keeps an imperfect eps from blowing up at large t. noise:
        the draws of self.noise, given in advance (a CUDA graph holds no generator); None draws them here."""
        chain = {k: v.tolist() for k, v in self.respaced(steps).items()}  # python numbers: no copy to the device
        if noise is None:
            noise = self.noise(shape, steps, generator, device, dtype)
        x = noise[0]
        for i in reversed(range(steps)):
            t = torch.full((shape[0],), chain["timesteps"][i], device=noise.device)
            eps = eps_fn(x, t).to(dtype)
            x0 = chain["sqrt_recip_abar"][i] * x - chain["sqrt_recipm1_abar"][i] * eps
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            x = chain["coef_x0"][i] * x0 + chain["coef_xt"][i] * x
            if i > 0:
                x = x + math.exp(0.5 * chain["log_var"][i]) * temperature * noise[steps - i]
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Diffusion head: MAR's small MLP that models p(c_i | z_i) for one token, z_i being the transformer output that
# predicts it. The condition enters in one place (timestep embedding + Linear(z)), and reaches every block through
# AdaLN shift/scale/gate; those modulations and the output layer start at zero, so the head starts as "predict 0".


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t (M,) -> (M, dim), as in DiT and MAR."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, cond):
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    def __init__(self, channels, cond_dim, width, depth, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.input_proj = nn.Linear(channels, width)
        self.time_embed = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, channels)
        for m in self.modules():  # MAR's init: xavier for linear layers, N(0, 0.02) for the timestep MLP ...
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.modulation[-1] for b in self.blocks] + [self.final_modulation[-1], self.output]:
            nn.init.zeros_(layer.weight)  # ... and zero for every modulation and the output layer
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, z):
        """Predict eps from x_t (M, C) at timesteps t (M,) given transformer outputs z (M, D)."""
        return self.predict(x_t, self.embed_time(t) + self.cond_embed(z))

    def embed_time(self, t):
        return self.time_embed(timestep_embedding(t, self.frequency_dim).to(self.cond_embed.weight.dtype))

    def predict(self, x_t, cond):
        """eps from x_t (M, C) and the condition cond (M, W) = embed_time(t) + cond_embed(z). A sampling chain has
        one z per row and one t for all rows, so it computes cond_embed(z) once and embed_time(t) on one row."""
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer: GPT-2 style pre-norm blocks (nanoGPT) with learned absolute positions. Causal, with a KV cache, for the
# discrete prior (sampling one more token attends to stored keys and values instead of recomputing the prefix);
# bidirectional for the continuous model, whose every position sees every other one (MAR).


class KVCache:
    """Keys and values of every layer for the first `length` positions; filled in place as tokens arrive."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.length = 0
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        if self.k[layer] is None:  # allocated on first use, in the dtype autocast gives k and v
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg, layer, causal=True):
        super().__init__()
        self.layer, self.n_head, self.dropout, self.causal = layer, cfg.n_head, cfg.dropout, causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, kv_cache=None):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)            # (B, nh, T, hs)
                   for t in self.qkv(x).split(D, dim=2))
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)                                        # (B, nh, past + T, hs)
            # new position i sees every cached position and the new ones up to itself
            mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg, layer, causal=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, layer, causal)
        self.norm2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Input embeddings (B, T, D) -> outputs (B, T, D); with a cache (causal only), the T inputs continue the cached
    positions."""

    def __init__(self, cfg, block_size, causal=True):
        super().__init__()
        self.block_size, self.causal = block_size, causal
        self.position_embed = nn.Embedding(block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, causal) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)

    def new_cache(self):
        if not self.causal:
            raise ValueError("a bidirectional transformer has no KV cache: every position sees the later ones")
        return KVCache(len(self.blocks), self.block_size)

    def forward(self, x, kv_cache=None):
        start = kv_cache.length if kv_cache is not None else 0
        T = x.shape[1]
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than the block size {self.block_size}")
        x = x + self.position_embed(torch.arange(start, start + T, device=x.device))
        for block in self.blocks:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)


def gpt2_init(module, n_layer):
    """GPT-2's init (nanoGPT): N(0, 0.02) for linear and embedding weights, N(0, 0.02 / sqrt(2 n_layer)) for the
    residual projections, zero biases."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            residual = name.endswith((".attn.proj", ".mlp.2"))
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# The discrete prior p(d | y), LlamaGen's recipe: one causal sequence [y, d_1 .. d_N] (without its last token, whose
# output would predict nothing); the output at position j predicts d_(j+1) with a softmax over the K codes. Trained
# with next-token cross-entropy, sampled token by token with a KV cache. It is the whole `discrete` baseline and the
# first half of DisCon. Classifier-free guidance: the class is replaced by a learned null class at rate label_drop.


def sample_token(logits, guidance, temperature, top_k, generator):
    """One token per row from logits (B, K), or with guidance (2B, K): conditional rows first."""
    if guidance != 1:
        logits = classifier_free_guidance(*logits.chunk(2), guidance)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)   # (B,)


class DiscretePrior(nn.Module):
    def __init__(self, cfg, num_tokens, codebook_size):
        super().__init__()
        self.cfg, self.num_tokens = cfg, num_tokens
        self.null_class = cfg.num_classes                                                 # the class of "no class"
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.n_embd)                  # last row: the null class
        self.token_embed = nn.Embedding(codebook_size, cfg.n_embd)
        self.transformer = Transformer(cfg, num_tokens, causal=True)
        self.logits = nn.Linear(cfg.n_embd, codebook_size, bias=False)
        gpt2_init(self, cfg.n_layer)

    def embed(self, y, d, start=0, end=None):
        """Input embeddings (B, end - start, D) of positions [start, end): position 0 holds y, position j holds d_j
        (1-based); sampling embeds only the new position at each step."""
        end = self.num_tokens if end is None else end
        parts = [self.class_embed(y)[:, None]] if start == 0 else []                      # (B, 1, D)
        if end > max(start, 1):
            parts.append(self.token_embed(d[:, max(start, 1) - 1:end - 1]))               # (B, ., D)
        return torch.cat(parts, dim=1)

    def forward(self, y, d, generator=None):
        """Next-token cross-entropy of the grids d (B, N) given labels y (B,)."""
        if self.training and self.cfg.label_drop > 0:  # learn the unconditional prior too
            drop = torch.rand(len(y), generator=generator, device=y.device) < self.cfg.label_drop
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        logits = self.logits(self.transformer(self.embed(y, d)))                         # (B, N, K)
        return F.cross_entropy(logits.flatten(0, 1).float(), d.flatten())

    @torch.no_grad()
    def sample(self, y, guidance, temperature, top_k, generator, use_kv_cache=True):
        """d (B, N) for labels y (B,), token by token. Guided, rows [B:] are the unconditional branch (null class);
        both halves see the tokens sampled so far. use_kv_cache=False recomputes the prefix at every step: the slow
        path the tests compare against."""
        B, N = len(y), self.num_tokens
        rows = y if guidance == 1 else torch.cat([y, torch.full_like(y, self.null_class)])
        d = torch.zeros(len(rows), N, dtype=torch.long, device=y.device)
        cache = self.transformer.new_cache() if use_kv_cache else None
        for pos in range(N):  # the output at position pos predicts d_(pos + 1)
            h = self.transformer(self.embed(rows, d, pos if use_kv_cache else 0, pos + 1), cache)[:, -1]   # (rows, D)
            d[:, pos] = sample_token(self.logits(h).float(), guidance, temperature, top_k, generator).repeat(len(rows) // B)
        return d[:B]


# ----------------------------------------------------------------------------------------------------------------------
# The continuous model p(c | d, y), MAR's masked autoregression. A bidirectional transformer over [y, x_1 .. x_N]:
# x_i embeds c_i where it is known and is a learned mask token where it is not; given d, x_i also carries the
# embedding of d_i, the discrete token aligned with position i, so every position sees the whole of d. Training hides a
# random subset of the positions (one mask ratio per forward: per process and micro-batch, as in MAR) and applies the diffusion loss there; sampling reveals the
# positions in a random order, several at a time, over K steps on a cosine schedule, and the diffusion head samples
# each step's tokens together. Without d this is MAR itself, the `continuous` baseline.
#
# Classifier-free guidance needs an unconditional model. p(c | d, null class) is not one: d nearly determines the class,
# so that branch would predict what the conditional one does. The condition is dropped as a whole at rate label_drop:
# the null class, and a grid of null codes.

MASK_RATIO_MIN, MASK_RATIO_STD = 0.7, 0.25   # MAR: the mask ratio is N(1, 0.25^2) truncated to [0.7, 1]


def mask_ratio(generator=None):
    """One draw of MAR's mask ratio, by inverting the normal CDF on the truncated interval [0.7, 1]. Drawn on the host:
    the ratio sets the batch's shapes, and a draw on a GPU would make the host wait for the GPU at every training step.
    A GPU generator seeds the host's draw from its seed and its offset, which advances as it draws (CUDA's philox)."""
    if generator is not None and generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(hash((generator.initial_seed(), generator.get_offset())) % 2**63)
    low = torch.special.ndtr(torch.tensor((MASK_RATIO_MIN - 1) / MASK_RATIO_STD, dtype=torch.float64))
    u = low + (0.5 - low) * torch.rand(1, generator=generator, dtype=torch.float64)
    return float(1 + MASK_RATIO_STD * torch.special.ndtri(u))


def reveal_schedule(num_tokens, steps):
    """How many tokens each of the K = steps sampling steps reveals (MAR's cosine schedule): after step k,
    floor(N cos(pi/2 (k + 1) / K)) stay masked, with at least one revealed per step and none left after the last."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"sampling_steps must be in [1, {num_tokens}] (the number of tokens), got {steps}")
    masked, counts = num_tokens, []
    for k in range(steps):
        left = 0 if k == steps - 1 else max(1, min(masked - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / steps))))
        counts.append(masked - left)
        masked = left
    return counts


class CapturedCall:
    """fn(*tensors, **constants) replayed from a CUDA graph: captured on the first call for each key (the tensors'
    shapes and dtypes, the constants, the autocast state), then replayed on static copies of the tensors, with a
    static output returned as a copy. Replaying costs one launch where fn costs hundreds of small kernels. fn must
    draw no random numbers and read no tensors but its arguments. Off CUDA, fn runs on the same static copies into
    the same static output, so the CPU tests check that copying and caching. A capture that fails warns and leaves
    that key to plain calls."""

    def __init__(self, fn):
        self.fn, self.captured = fn, {}

    def __call__(self, *tensors, **constants):
        device = next(x.device for x in tensors if x is not None)
        autocast = (_autocast_enabled(device.type), _autocast_dtype(device.type))
        key = (tuple(None if x is None else (x.shape, x.dtype) for x in tensors), tuple(sorted(constants.items())),
               autocast)
        if key not in self.captured:
            self.captured[key] = self.capture(tensors, constants, device, *autocast)
        if self.captured[key] is None:
            return self.fn(*tensors, **constants)
        graph, static, output = self.captured[key]
        for copy, x in zip(static, tensors):
            if x is not None:
                copy.copy_(x)
        if graph is None:
            output.copy_(self.fn(*static, **constants))
        else:
            graph.replay()
        return output.clone()

    def capture(self, tensors, constants, device, autocast_enabled, autocast_dtype):
        static = [None if x is None else x.clone() for x in tensors]
        run = lambda: self.fn(*static, **constants)
        if device.type != "cuda":
            return None, static, run()
        try:
            # Autocast's cache of cast weights would be freed under the graph's feet when autocast exits: off here.
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_enabled, cache_enabled=False):
                side = torch.cuda.Stream(device)  # warm-up on a side stream (lazy init, cuBLAS workspaces)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    output = run()
            return graph, static, output
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed, sampling without graphs: {error}")
            return None


def _autocast_enabled(device_type):
    return torch.is_autocast_enabled(device_type) if hasattr(torch, "get_autocast_dtype") else (
        torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled())


def _autocast_dtype(device_type):
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


class ContinuousModel(nn.Module):
    def __init__(self, cfg, num_tokens, latent_channels, codebook_size=None):
        super().__init__()
        self.cfg, self.num_tokens, self.channels = cfg, num_tokens, latent_channels
        self.conditioned = codebook_size is not None                                      # p(c | d, y), else p(c | y)
        self.null_class = cfg.num_classes
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.n_embd)                  # last row: the null class
        self.latent_proj = nn.Linear(latent_channels, cfg.n_embd)
        self.mask_token = nn.Parameter(torch.zeros(cfg.n_embd))
        if self.conditioned:
            self.null_code = codebook_size
            self.code_embed = nn.Embedding(codebook_size + 1, cfg.n_embd)                 # last row: the null code
        self.transformer = Transformer(cfg, num_tokens + 1, causal=False)
        gpt2_init(self, cfg.n_layer)
        nn.init.normal_(self.mask_token, std=0.02)                                        # MAR's init of its mask token
        # Built after the init above, so that the head's zero-initialised layers stay zero.
        self.diffusion_head = DiffusionHead(latent_channels, cfg.n_embd, cfg.head_width, cfg.head_depth)
        self.diffusion = GaussianDiffusion(cfg.num_timesteps)

    def embed(self, y, c, d, known):
        """Input embeddings (B, N + 1, D): the class, then each position's latent c_i (B, N, C) where known (B, N) is
        true and the mask token where not, plus the embedding of its discrete token d_i (B, N) when conditioned."""
        x = torch.where(known[..., None], self.latent_proj(c), self.mask_token.to(c.dtype))  # (B, N, D)
        if self.conditioned:
            x = x + self.code_embed(d)
        return torch.cat([self.class_embed(y)[:, None].to(x.dtype), x], dim=1)

    def drop_condition(self, y, d, drop):
        """The labels and grids with the rows where drop (B,) is true replaced by the null class and null codes."""
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        if self.conditioned:
            d = torch.where(drop[:, None], torch.full_like(d, self.null_code), d)
        return y, d

    def forward(self, c, d, y, generator=None):
        """Diffusion loss of the masked positions of c (B, N, C), given d (B, N; None when unconditioned) and y (B,)."""
        B, N, C = c.shape
        if self.training and self.cfg.label_drop > 0:
            y, d = self.drop_condition(y, d, torch.rand(B, generator=generator, device=y.device) < self.cfg.label_drop)
        n = math.ceil(mask_ratio(generator) * N)                                          # masked positions per image
        order = torch.rand(B, N, generator=generator, device=c.device).argsort(dim=1)     # a random order per image
        hidden = order[:, :n]                                                             # (B, n)
        known = torch.ones(B, N, dtype=torch.bool, device=c.device).scatter(1, hidden, False)
        h = self.transformer(self.embed(y, c, d, known))[:, 1:]                           # (B, N, D)
        z = h.gather(1, hidden[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)      # (B*n, D)
        target = c.gather(1, hidden[..., None].expand(-1, -1, C)).flatten(0, 1)           # (B*n, C)
        mul = self.cfg.diffusion_batch_mul  # every condition gets `mul` independent (t, noise) draws
        return self.diffusion.loss(self.diffusion_head, target.repeat(mul, 1), z.repeat(mul, 1), generator)

    @torch.no_grad()
    def sample(self, y, d, guidance, temperature, steps, diffusion_steps, generator, head_autocast=False,
               graphs=False):
        """c (B, N, C) for labels y (B,) and grids d (B, N; None when unconditioned): each image reveals its positions
        in its own random order, as many at each of the `steps` steps as reveal_schedule says. Guidance ramps
        linearly with the fraction revealed after the step (MAR's linear schedule, from 1 to `guidance`); rows [B:]
        are the unconditional branch, with the same known latents. head_autocast: see sample_latent. graphs: each
        step replayed from a CUDA graph (CapturedCall; the same samples, fewer kernel launches)."""
        B, N, C = len(y), self.num_tokens, self.channels
        device, dtype = self.mask_token.device, self.mask_token.dtype
        diffusion_steps = self.cfg.diffusion_steps if diffusion_steps is None else diffusion_steps
        order = torch.rand(B, N, generator=generator, device=device).argsort(dim=1)       # (B, N) positions by turn
        c = torch.zeros(B, N, C, dtype=dtype, device=device)
        known = torch.zeros(B, N, dtype=torch.bool, device=device)
        y_in, d_in = y, d
        if guidance != 1:
            y_in, d_in = self.drop_condition(y.repeat(2), None if d is None else d.repeat(2, 1),
                                             torch.arange(2 * B, device=device) >= B)
        if graphs and not hasattr(self, "_captured_reveal"):
            self._captured_reveal = CapturedCall(self.reveal)
        reveal = self._captured_reveal if graphs else self.reveal
        start = 0
        for count in reveal_schedule(N, steps):
            now = order[:, start:start + count]                                           # (B, count) revealed now
            noise = self.diffusion.noise((B * count, C), diffusion_steps, generator, device, dtype)
            latent = reveal(y_in, d_in, c, known, now, noise, guidance=1 + (guidance - 1) * (start + count) / N,
                            temperature=temperature, head_autocast=head_autocast)
            c.scatter_(1, now[..., None].expand(-1, -1, C), latent.view(B, count, C).to(dtype))
            known.scatter_(1, now, True)
            start += count
        return c

    def reveal(self, y, d, c, known, now, noise, guidance, temperature, head_autocast):
        """One sampling step: the latents (B count, C) of the positions now (B, count), given the known ones. y and d
        hold both branches when guided (2B rows); noise is the head chain's draws (GaussianDiffusion.noise)."""
        rows = len(y) // len(c)
        h = self.transformer(self.embed(y, c.repeat(rows, 1, 1), d, known.repeat(rows, 1)))[:, 1:]
        z = h.gather(1, now.repeat(rows, 1)[..., None].expand(-1, -1, h.shape[-1]))       # (rows B, count, D)
        return self.sample_latent(z.flatten(0, 1), guidance, temperature, len(noise), noise=noise,
                                  head_autocast=head_autocast)

    def sample_latent(self, z, guidance, temperature, steps, generator=None, noise=None, head_autocast=False):
        """One continuous token per row: the head's reverse chain conditioned on z (M, D), or with guidance (2M, D),
        conditional rows first. noise: the chain's draws (None: from generator).
        The chain's arithmetic runs in the weights' precision even under autocast: at large t a step multiplies eps by
        up to 1 / sqrt(abar) (about 2e4 at t = 999), which would magnify bf16 rounding. head_autocast leaves the head's
        layers (its matmuls) to the caller's autocast, and casts their eps back before the chain uses it."""
        head, dtype = self.diffusion_head, self.mask_token.dtype
        with contextlib.nullcontext() if head_autocast else torch.autocast(z.device.type, enabled=False):
            z_embedded = head.cond_embed(z.to(dtype))  # the part of the head's condition fixed for the chain: once

            def eps_fn(x_t, t):  # one head call per diffusion step for the whole batch (both halves when guided)
                cond = head.embed_time(t[:1]) + z_embedded  # every row is at the same timestep
                if guidance == 1:
                    return head.predict(x_t, cond)
                eps = head.predict(torch.cat([x_t, x_t]), cond).to(dtype)  # mixed in float32 under head_autocast too
                return classifier_free_guidance(*eps.chunk(2), guidance)

            shape = (len(z) // 2 if guidance != 1 else len(z), self.channels)
            return self.diffusion.sample(eps_fn, shape, steps, temperature, generator, z.device, dtype,
                                         clip_x0=self.cfg.clip_latent, noise=noise)


# ----------------------------------------------------------------------------------------------------------------------
# DisCon: the frozen tokenizer, the discrete prior p(d | y) and the continuous model p(c | d, y), trained side by side
# on the same batches (each with a loss and a gradient clip of its own) and sampled one after the other. The
# baselines keep one of the two: `discrete` the prior (decoded from the codebook), `continuous` the continuous model
# without d (MAR).


class DisCon(nn.Module):
    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        tok_cfg = tokenizer.cfg
        self.num_tokens = tok_cfg.grid_size ** 2                                           # N
        # Built in this order from the caller's seed, so the prior of a `discon` model starts, and trains, as the
        # `discrete` model of the same seed.
        if cfg.mode in ("discon", "discrete"):
            self.prior = DiscretePrior(cfg, self.num_tokens, tok_cfg.codebook_size)
        if cfg.mode in ("discon", "continuous"):
            codes = tok_cfg.codebook_size if cfg.mode == "discon" else None
            self.continuous = ContinuousModel(cfg, self.num_tokens, tok_cfg.latent_channels, codes)
            reveal_schedule(self.num_tokens, cfg.sampling_steps)  # checks that K fits the grid
        self.tokenizer = tokenizer.requires_grad_(False).eval()                           # frozen after stage 1

    def parts(self):
        """The trained models: the prior and/or the continuous model."""
        return [m for m in (getattr(self, "prior", None), getattr(self, "continuous", None)) if m is not None]

    def train(self, mode=True):
        super().train(mode)
        self.tokenizer.eval()  # the frozen tokenizer never trains
        return self

    # -- inputs ----------------------------------------------------------------------------------------------------

    def check_labels(self, y, batch=None):
        if y.dim() != 1 or y.dtype != torch.long:
            raise ValueError(f"labels must be a 1-d long tensor, got shape {tuple(y.shape)} and dtype {y.dtype}")
        if batch is not None and len(y) != batch:
            raise ValueError(f"got {len(y)} labels for {batch} images")
        # The range is checked on the CPU only: on an accelerator it would cost a device-host sync per step.
        if y.device.type == "cpu" and len(y) and (y.min() < 0 or y.max() >= self.cfg.num_classes):
            raise ValueError(f"labels must be in [0, {self.cfg.num_classes}), got values in [{int(y.min())}, "
                             f"{int(y.max())}]")

    def tokens(self, x):
        """Images, or a (c, d) pair from Tokenizer.encode -> c (B, N, C) and d (B, N) in raster order."""
        g, C = self.tokenizer.cfg.grid_size, self.tokenizer.cfg.latent_channels
        if isinstance(x, (tuple, list)):
            c, d = x
            if c.dim() != 4 or tuple(c.shape[1:]) != (C, g, g) or tuple(d.shape) != (c.shape[0], g, g):
                raise ValueError(f"c and d do not match this tokenizer: expected c of shape (B, {C}, {g}, {g}) and d "
                                 f"of shape (B, {g}, {g}), got {tuple(c.shape)} and {tuple(d.shape)}")
        else:
            c, d = self.tokenizer.encode(x)
        return c.flatten(2).transpose(1, 2), d.flatten(1)                            # (B, N, C), (B, N)

    # -- training --------------------------------------------------------------------------------------------------

    def forward(self, x, y, generator=None):
        """Training losses for images x (B, 3, H, W) in [-1, 1] or a (c, d) pair, and labels y (B,): "ce" of the
        prior, "diffusion" of the continuous model, and their sum "loss". The prior draws its noise first, so it sees
        what the `discrete` model of the same seed sees."""
        c, d = self.tokens(x)
        self.check_labels(y, len(d))
        terms = {}
        if hasattr(self, "prior"):
            terms["ce"] = self.prior(y, d, generator)
        if hasattr(self, "continuous"):
            terms["diffusion"] = self.continuous(c, d if self.cfg.mode == "discon" else None, y, generator)
        terms["loss"] = sum(terms.values())
        return terms

    # -- sampling --------------------------------------------------------------------------------------------------

    def sampling_settings(self, guidance=None, guidance_continuous=None, temperature=None, temperature_continuous=None):
        """-> (guidance, guidance_continuous, temperature, temperature_continuous) that generate uses: a shared value
        sets both phases unless the continuous phase's own is given; None everywhere means the config's."""
        cfg = self.cfg
        return (*_resolved(guidance, guidance_continuous, cfg.guidance, cfg.guidance_continuous),
                *_resolved(temperature, temperature_continuous, cfg.temperature, cfg.temperature_continuous))

    @torch.no_grad()
    def generate(self, y, guidance=None, guidance_continuous=None, temperature=None, top_k=0, diffusion_steps=None,
                 generator=None, use_kv_cache=True, codes=None, temperature_continuous=None, sampling_steps=None,
                 discrete_only=False, head_autocast=None, graphs=False):
        """Sample images (B, 3, H, W) uint8 for labels y (B,): d from the prior, then c given d, then decode c.

        guidance: the classifier-free guidance scale of the discrete phase (on the logits) and, unless
        guidance_continuous is given, of the continuous phase (on the head's eps, ramped from 1); 1 means no
        guidance. When neither is given, the config's scales are used (as for the temperatures, diffusion_steps and
        sampling_steps).
        temperature: divides the logits and, unless temperature_continuous is given, scales the diffusion noise (MAR).
        temperature_continuous: the diffusion noise's scale alone (None: temperature if given, else the config's);
        unused in discrete mode.
        top_k: 0 keeps every code.
        sampling_steps: K, the steps of the continuous model (None: the config's).
        use_kv_cache=False recomputes the prior's prefix at every step: the slow path the tests compare against.
        codes: "discon" mode only, a discrete grid (B, h, w) to condition on instead of sampling d: p(c | d, y) alone.
        discrete_only: "discon" mode only, decode d's codebook vectors instead of sampling c: the `discrete` baseline
        on this model's prior, with the d that the same generator seed gives DisCon.
        head_autocast: the diffusion head under the caller's autocast (None: the config's head_autocast).
        graphs: replay each step of the continuous model from a CUDA graph (on a CPU: the same steps, plainly run).
        """
        self.check_labels(y)
        guidance, guidance_continuous, temperature, temperature_continuous = self.sampling_settings(
            guidance, guidance_continuous, temperature, temperature_continuous)
        if min(temperature, temperature_continuous) <= 0:
            raise ValueError(f"temperature and temperature_continuous must be > 0, got {temperature} and "
                             f"{temperature_continuous}")
        g, mode = self.tokenizer.cfg.grid_size, self.cfg.mode
        if codes is not None and (mode != "discon" or tuple(codes.shape) != (len(y), g, g)):
            raise ValueError(f"codes must be a (B, {g}, {g}) grid for a discon-mode model, got {tuple(codes.shape)} "
                             f"in mode {mode!r}")
        if discrete_only and mode != "discon":
            raise ValueError(f"discrete_only decodes the prior's d of a discon-mode model, this one is {mode!r}")
        was_training = self.training
        self.eval()
        B = len(y)
        d = None
        if codes is not None:
            d = codes.flatten(1).to(y.device)
        elif hasattr(self, "prior"):
            d = self.prior.sample(y, guidance, temperature, top_k, generator, use_kv_cache)   # (B, N)
        if mode == "discrete" or discrete_only:
            images = self.tokenizer.decode_codes(d.view(B, g, g))
        else:
            steps = self.cfg.sampling_steps if sampling_steps is None else sampling_steps
            head_autocast = self.cfg.head_autocast if head_autocast is None else head_autocast
            c = self.continuous.sample(y, d if mode == "discon" else None, guidance_continuous, temperature_continuous,
                                       steps, diffusion_steps, generator, head_autocast, graphs)  # (B, N, C)
            images = self.tokenizer.decode(c.transpose(1, 2).reshape(B, -1, g, g))
        self.train(was_training)
        return to_uint8(images)


def _resolved(shared, continuous, shared_default, continuous_default):
    """(discrete phase, continuous phase) of a setting: a given value for both unless the continuous one is given;
    the config's where neither is."""
    if continuous is None:
        continuous = continuous_default if shared is None else shared
    return (shared_default if shared is None else shared), continuous


def build_model(tokenizer_config, model_config):
    """Rebuild a DisCon model (with its tokenizer) from the config dicts saved in a checkpoint."""
    return DisCon(DisConConfig(**model_config), Tokenizer(TokenizerConfig(**tokenizer_config)))
