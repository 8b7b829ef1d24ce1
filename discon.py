"""DisCon (Zheng et al., "Rethinking Discrete Tokens: Treating Them as Conditions for Continuous Autoregressive Image
Synthesis", arXiv 2507.01756, ICCV 2025) in one file: p(c | y) = sum_d p(d | y) p(c | d, y), y the class. An image
has two views of one latent grid, the discrete VQ index grid d and the continuous latent grid c; DisCon samples d from
a discrete autoregressive prior, then c from a masked continuous model given d, and decodes only c. The file reads
like the method: configs, the tokenizer (c and d of one grid), Gaussian diffusion and the diffusion head (p(c_i | .) of
one token), the transformer, the prior p(d | y) (LlamaGen-like), the continuous model p(c | d, y) (MAR-like), DisCon.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MODES = ("discon", "continuous", "discrete")

# ----------------------------------------------------------------------------------------------------------------------
# Configs: the defaults are the quick preset (README's quick start), PRESETS the GPU ones. Checkpoints store asdict().


@dataclass
class TokenizerConfig:
    image_size: int = 32               # CIFAR-10 and the built-in shapes are 32x32
    in_channels: int = 3
    base_channels: int = 16            # rFID of c 92 at 16, 135 at 8, no better at 32 (quick preset, experiments.md)
    downsample: int = 8                # 32x32 -> a 4x4 grid, N = 16 tokens (the paper: 256 -> 16x16, N = 256)
    latent_channels: int = 16          # C (VA-VAE, the paper's continuous tokenizer, has 32)
    codebook_size: int = 128           # K (MaskGIT's VQGAN, the paper's discrete tokenizer, has 1024)
    kl_weight: float = 1e-4            # small, as LDM's KL autoencoders: it only keeps c bounded and smooth
    commitment_weight: float = 0.25    # beta of VQ-VAE (van den Oord et al. 2017), also LlamaGen's
    dead_code_threshold: float = 0.1   # a code whose usage EMA falls below this is restarted on an encoder output
    usage_decay: float = 0.99          # EMA decay of the per-code usage counts
    decoder_noise: float = 0.3         # the decoder also learns c + this std(c) N(0, 1), as samples miss c (README)

    def __post_init__(self):
        check_fields(self, positive=("image_size", "in_channels", "base_channels", "latent_channels", "codebook_size"),
                     non_negative=("kl_weight", "commitment_weight", "dead_code_threshold", "decoder_noise"),
                     below=dict(usage_decay=1))
        if self.downsample < 2 or self.downsample & (self.downsample - 1):  # n & (n - 1) is 0 for powers of 2 only
            raise ValueError(f"downsample must be a power of 2 (4 or 8), got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")

    @property
    def grid_size(self):
        return self.image_size // self.downsample


@dataclass
class DisConConfig:
    mode: str = "discon"               # "discon" (the method), "continuous" (MAR) or "discrete" (LlamaGen-like)
    num_classes: int = 10              # set from the dataset by train.py
    n_layer: int = 2                   # depth of each transformer (the prior's and the continuous model's)
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0               # attention weights and MLP output (MAR: 0.1); 0 for runs of a few epochs
    label_drop: float = 0.1            # classifier-free guidance: condition dropped at this rate (MAR's, LlamaGen's)
    class_tokens: int = 1              # leading positions of the continuous model holding the class, never masked:
                                       # MAR's buffer (64 for 256 tokens); 4 and 16 gained nothing here (experiments.md)
    head_width: int = 128              # MAR-B's head is 1024 wide and 6 deep (its README); scaled down here
    head_depth: int = 2
    diffusion_batch_mul: int = 1       # (t, noise) draws per condition per step (MAR: 4); 1 is faster on a CPU
    num_timesteps: int = 1000          # DDPM's and MAR's training steps
    # Sampling defaults, each one phase's, picked on the quick preset (experiments.md: "What limits the continuous")
    discrete_guidance: float = 3.0     # classifier-free guidance scale on the prior's logits; 1 = none
    discrete_temperature: float = 0.6  # divides the prior's logits
    continuous_guidance: float = 1.0   # scale on the head's eps, ramped up from 1 as tokens are revealed (MAR)
    continuous_temperature: float = 0.4  # scales the noise of the head's reverse chain (MAR's temperature)
    sampling_steps: int = 4            # steps of the continuous model, each revealing several tokens (MAR: 64 for 256)
    diffusion_steps: int = 10          # respaced reverse-diffusion steps of the head per token (MAR: 100)
    clip_latent: float = 5.0           # the chain clamps its estimate of the clean c (unit std) to +-this, as ADM's
                                       # clip_denoised: the first step multiplies eps by 1 / sqrt(abar_999) = 2e4

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown: choose one of {', '.join(MODES)}")
        check_fields(self, positive=("num_classes", "n_layer", "n_head", "n_embd", "class_tokens", "head_width",
                                     "head_depth", "diffusion_batch_mul", "num_timesteps", "discrete_temperature",
                                     "continuous_temperature", "sampling_steps", "diffusion_steps", "clip_latent"),
                     non_negative=("discrete_guidance", "continuous_guidance"), below=dict(dropout=1, label_drop=0.5))
        if self.diffusion_steps > self.num_timesteps:
            raise ValueError(f"diffusion_steps {self.diffusion_steps} is more than num_timesteps {self.num_timesteps}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


def check_fields(config, positive=(), non_negative=(), below=None):
    """ValueError naming the first field in `positive` that is not a finite number > 0, in `non_negative` not >= 0, or
    in `below` ({field: bound}) not in [0, bound). It starts with the field's name, which train.py makes a flag."""
    for name in positive + non_negative:
        value = getattr(config, name)
        if not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            raise ValueError(f"{name} must be {'> 0' if name in positive else '>= 0'}, got {value}")
    for name, bound in (below or {}).items():
        if not 0 <= getattr(config, name) < bound:
            raise ValueError(f"{name} must be in [0, {bound}), got {getattr(config, name)}")


# Each preset's fields that differ from the defaults (train.py adds its data and optimisation). GPT-2 small's depth at
# width 512 (CIFAR-10), MAR-B's 24 x 768 (ImageNet-64); MAR's default head (1024 x 3), 100 diffusion steps, 64 class
# positions and sampling steps per 256 tokens (its best FID takes 256 steps); temperature 1, guidance 1.5 on d
# (LlamaGen's sample_c2i_ddp.py) and 2.9 on c (MAR-B, LTH14/mar's README). Never trained end to end: sweep them.
GPU = dict(head_width=1024, head_depth=3, diffusion_batch_mul=4, diffusion_steps=100, discrete_guidance=1.5,
           discrete_temperature=1.0, continuous_guidance=2.9, continuous_temperature=1.0)
PRESETS = {
    "quick": ({}, {}),
    "cifar10": (dict(base_channels=64, downsample=4, latent_channels=8, codebook_size=512),
                dict(n_layer=12, n_head=8, n_embd=512, dropout=0.1, class_tokens=16, sampling_steps=16, **GPU)),
    "imagenet64": (dict(image_size=64, base_channels=128, downsample=4, latent_channels=16, codebook_size=1024),
                   dict(n_layer=24, n_head=12, n_embd=768, class_tokens=64, sampling_steps=64, **GPU)),
}


def to_uint8(x):
    """Images in [-1, 1], (B, 3, H, W) float -> (B, 3, H, W) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: a conv encoder gives the continuous grid c; a VQ codebook over the same grid gives the discrete grid d,
# aligned with c position by position. One decoder decodes both views, so the information that quantization loses
# shows as the gap between the two reconstructions (the paper's Figure 1). The paper pairs VA-VAE with MaskGIT's VQGAN.


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), without LDM's GroupNorm, with which images came out grey (experiments.md)."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


def encoder_and_decoder(cfg):
    """Conv stacks image -> (posterior mean, log-variance) and latents -> image, mirrored; the width doubles at each
    downsampling by 2, capped at 4x (LDM's f=4 autoencoder: 1, 2, 4)."""
    w = [cfg.base_channels * min(2 ** i, 4) for i in range(int(math.log2(cfg.downsample)) + 1)]
    encoder = [nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)]
    for a, b in zip(w, w[1:]):
        encoder += [ResBlock(a, b), nn.Conv2d(b, b, 3, stride=2, padding=1)]
    encoder += [ResBlock(w[-1], w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 2 * cfg.latent_channels, 1)]
    decoder = [nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1), ResBlock(w[-1], w[-1])]
    for a, b in zip(w[::-1], w[::-1][1:]):
        decoder += [nn.Upsample(scale_factor=2), nn.Conv2d(a, a, 3, padding=1), ResBlock(a, b)]
    decoder += [nn.SiLU(), nn.Conv2d(w[0], cfg.in_channels, 3, padding=1)]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def nearest_code(z, codes):
    """Index (M,) of the nearest code (K, C) to each row of z (M, C), by squared Euclidean distance. Computed in float32
    even under autocast: bf16 distances can pick a farther code."""
    with torch.autocast(z.device.type, enabled=False):
        z, codes = z.float(), codes.float()
        return (z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1)).argmin(1)


class Tokenizer(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> continuous grid c (B, C, h, w) and discrete grid d (B, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = encoder_and_decoder(cfg)
        for m in self.modules():  # variance-preserving init (std 1 / sqrt(fan_in)): colour survives a dozen layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.latent_channels)
        # Usage starts at zero, so the first training step restarts every code on an encoder output (a data init).
        self.register_buffer("code_usage", torch.zeros(cfg.codebook_size))
        # Per-channel statistics of c over the training set (fit_latent_stats): MAR scales its latents by one scalar.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def check_images(self, x):
        expected = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
            raise ValueError(f"expected float images of shape (B, {', '.join(map(str, expected))}) in [-1, 1], got "
                             f"{tuple(x.shape)} {x.dtype}: resize them, and convert uint8 ones with x / 127.5 - 1")

    def quantize(self, z):
        """z (B, C, h, w) -> (q, d, vq_loss): q the codes of d with z's gradient (straight-through), d (B, h, w) the
        nearest codes, vq_loss VQ-VAE's codebook term plus commitment_weight times its commitment term."""
        B, C, h, w = z.shape
        d = nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C), self.codebook.weight)    # (B h w,)
        q = self.codebook(d).view(B, h, w, C).permute(0, 3, 1, 2)                        # (B, C, h, w)
        vq_loss = F.mse_loss(q, z.detach()) + self.cfg.commitment_weight * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), d.view(B, h, w), vq_loss

    @torch.no_grad()
    def restart_dead_codes(self, z, generator=None):
        """Move each code whose usage EMA is below dead_code_threshold onto a random encoder output of z (B, C, h, w)
        of all processes, with a usage of 1 (a grace period). Every code draws a candidate (torch.randint) and the dead
        ones take theirs: counting them would cost a host sync."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                             # (B h w, C)
        if dist.is_initialized():  # the whole batch, in rank order: the codebook does not depend on the split
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, flat.contiguous())
            flat = torch.cat(parts)
        pick = torch.randint(0, len(flat), (self.cfg.codebook_size,), generator=generator, device=flat.device)
        candidates = flat[pick].to(self.codebook.weight.dtype)                           # (K, C)
        if dist.is_initialized():
            dist.broadcast(candidates, src=0)  # every rank must hold the same codebook
        dead = self.code_usage < self.cfg.dead_code_threshold                            # (K,)
        self.codebook.weight.data.copy_(torch.where(dead[:, None], candidates, self.codebook.weight))
        self.code_usage.copy_(torch.where(dead, torch.ones_like(self.code_usage), self.code_usage))

    @torch.no_grad()
    def update_usage(self, d):
        """Fold the code counts of d (all processes') into the usage EMA -> (perplexity, fraction of codes used)."""
        counts = torch.bincount(d.flatten(), minlength=self.cfg.codebook_size).float()
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.code_usage.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)
        probs = counts / counts.sum()
        return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()), (counts > 0).float().mean()

    def forward(self, x, generator=None):
        """Training losses of images x, a dict; "loss" is the one to backpropagate. The decoder reconstructs x from
        both views: c, a posterior sample plus decoder_noise times c's per-channel std (over the batch) of noise, and
        d's codebook vectors. L1 reconstruction, as LDM's autoencoder (without its perceptual and GAN terms)."""
        self.check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:  # before the noise, whose draws depend on how the batch is split over processes
            self.restart_dead_codes(mean, generator)
        noise = lambda: torch.randn(mean.shape, generator=generator, device=x.device, dtype=mean.dtype)
        c = mean + torch.exp(0.5 * logvar) * noise()
        if self.cfg.decoder_noise > 0:
            scale = mean.detach().std(dim=(0, 2, 3), keepdim=True, correction=0)          # (1, C, 1, 1)
            c = c + self.cfg.decoder_noise * scale * noise()
        q, d, vq_loss = self.quantize(mean)
        rec_c, rec_d = self.decoder(torch.cat([c, q])).chunk(2)
        terms = {"rec_continuous": (rec_c - x).abs().mean(), "rec_discrete": (rec_d - x).abs().mean(),
                 "kl": 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean(), "vq": vq_loss}
        terms["loss"] = terms["rec_continuous"] + terms["rec_discrete"] + self.cfg.kl_weight * terms["kl"] + vq_loss
        if self.training:
            terms["perplexity"], terms["usage"] = self.update_usage(d)
        return terms

    # Encoding and decoding run in float32 even under autocast, so that a GPU sees the d and images a CPU sees (bf16
    # changes both: docs/gpu.md, "Precision").

    @torch.no_grad()
    def encode(self, x, normalise=True):
        """Images -> (c, d): c the posterior mean (B, C, h, w), normalised unless told not, d its nearest codes."""
        self.check_images(x)
        with torch.autocast(x.device.type, enabled=False):
            mean = self.encoder(x.to(self.codebook.weight.dtype))[:, :self.cfg.latent_channels]
        c = (mean - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1) if normalise else mean
        return c, self.quantize(mean)[1]

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
        """Set latent_mean, latent_std to the per-channel mean and population std (in float64) of the posterior mean
        over an iterable of image batches -> (mean, std)."""
        total, total_sq, count = 0.0, 0.0, 0
        for x in batches:
            mean = self.encode(x.to(self.latent_mean.device), normalise=False)[0].double()
            total, total_sq = total + mean.sum((0, 2, 3)), total_sq + mean.pow(2).sum((0, 2, 3))
            count += mean.numel() // mean.shape[1]
        mu = total / count
        self.latent_mean.copy_(mu)
        self.latent_std.copy_((total_sq / count - mu.pow(2)).clamp_min(1e-12).sqrt())
        return self.latent_mean.clone(), self.latent_std.clone()


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian diffusion over one token's C channels (DDPM, Ho et al. 2020), as MAR's diffusion loss uses it: cosine
# schedule (Nichol & Dhariwal 2021), T = 1000, epsilon prediction, ancestral sampling on a respaced subset of steps.
# MAR learns the variance (an extra VLB term); here it is fixed at the posterior variance, which is simpler.


def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """betas (T,) float64 of the cosine schedule: abar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2,
    beta_i = 1 - abar(i + 1) / abar(i), each clipped to max_beta."""
    f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)], dtype=torch.float64)


def classifier_free_guidance(cond, uncond, scale):
    """Ho & Salimans 2022: from the unconditional prediction towards (and past, for scale > 1) the conditional one."""
    return uncond + scale * (cond - uncond)


class GaussianDiffusion(nn.Module):  # no parameters; a module so that its tables follow the model to its device

    def __init__(self, num_timesteps=1000):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.alphas_cumprod = torch.cumprod(1 - cosine_betas(num_timesteps), dim=0)  # abar (T,), float64, on the CPU
        self.register_buffer("sqrt_abar", self.alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1 - self.alphas_cumprod).sqrt().float(), persistent=False)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for x0 and noise (M, C) and timesteps t (M,)."""
        return (self.sqrt_abar[t].to(x0.dtype)[:, None] * x0
                + self.sqrt_one_minus_abar[t].to(x0.dtype)[:, None] * noise)

    def loss(self, model, x0, cond, generator=None):
        """Epsilon-prediction MSE of model(x_t, t, cond) for x0 (M, C) under conditions cond (M, D). Draws, in this
        order: t (M,) uniform in [0, T - 1] (torch.randint), then the noise like x0 (torch.randn)."""
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, cond).float(), noise.float())

    def respaced(self, diffusion_steps):
        """The reverse chain on `diffusion_steps` timesteps (improved DDPM's respacing): a dict of float64 tensors,
        ascending in t. "timesteps" (long): linspace(T - 1, 0, diffusion_steps) rounded (one step: [T - 1]);
        "alphas_cumprod": abar there; "coef_x0", "coef_xt": the posterior mean coef_x0 x0 + coef_xt x_t given the
        previous step; "log_var": the posterior variance's log, its first entry (0) set to the second's (0 for one
        step), as improved DDPM. ValueError unless 1 <= diffusion_steps <= T."""
        if not 1 <= diffusion_steps <= self.num_timesteps:
            raise ValueError(f"diffusion_steps must be in [1, {self.num_timesteps}], not {diffusion_steps}")
        t = torch.linspace(self.num_timesteps - 1, 0, diffusion_steps).round().long().flip(0)
        abar = self.alphas_cumprod[t]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = 1 - abar / abar_prev
        var = betas * (1 - abar_prev) / (1 - abar)                                         # beta tilde
        log_var = torch.log(torch.cat([var[1:2], var[1:]])) if diffusion_steps > 1 else torch.zeros(1).double()
        return dict(timesteps=t, alphas_cumprod=abar, coef_x0=betas * abar_prev.sqrt() / (1 - abar),
                    coef_xt=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar), log_var=log_var)

    def sample(self, eps_fn, shape, diffusion_steps, temperature=1.0, generator=None, device=None,
               dtype=torch.float32, clip_x0=None):
        """Ancestral sampling of x0 `shape` from x_T ~ N(0, I), with eps_fn(x_t, t) -> eps, t (M,) one timestep for all
        rows. Each step's estimate x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), clamped to +-clip_x0 if given, sets
        the posterior mean; every step but the last adds temperature * exp(log_var / 2) * N(0, I) (MAR). Draws, in
        order: x_T, then each step's noise (none at the last). Runs in `dtype`, eps cast to it."""
        chain = {k: v.tolist() for k, v in self.respaced(diffusion_steps).items()}  # Python numbers: no copies
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        for i in reversed(range(diffusion_steps)):
            abar = chain["alphas_cumprod"][i]
            eps = eps_fn(x, torch.full((shape[0],), chain["timesteps"][i], device=device)).to(dtype)
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            x = chain["coef_x0"][i] * x0 + chain["coef_xt"][i] * x
            if i > 0:
                noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + temperature * math.exp(0.5 * chain["log_var"][i]) * noise
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Diffusion head: MAR's small MLP that models p(c_i | z_i) for one token, z_i being the transformer output that
# predicts it. The condition enters in one place (timestep embedding + Linear(z)) and reaches every block through
# AdaLN shift, scale and gate; those and the output layer start at zero, so the head starts as "predict 0".


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (M, dim) of timesteps t (M,): [cos(t f), sin(t f)], f_k = max_period^(-k / (dim / 2)),
    as in DiT and MAR."""
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
        """x + gate * mlp(norm(x) * (1 + scale) + shift), with (shift, scale, gate) = modulation(cond)."""
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
        """eps (M, C) from x_t (M, C) at timesteps t (M,) given transformer outputs z (M, D)."""
        return self.predict(x_t, self.embed_time(t) + self.cond_embed(z))

    def embed_time(self, t):
        return self.time_embed(timestep_embedding(t, self.frequency_dim).to(self.cond_embed.weight.dtype))

    def predict(self, x_t, cond):
        """eps (M, C) from x_t (M, C) and cond = embed_time(t) + cond_embed(z) (M or 1, W): input_proj, the AdaLN
        blocks, then final_norm modulated by (shift, scale) = final_modulation(cond), then output."""
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer: GPT-2 style pre-norm blocks (nanoGPT) with learned absolute positions. Causal, with a KV cache, for the
# discrete prior (one more token attends to the stored keys and values instead of recomputing the prefix);
# bidirectional for the continuous model, whose every position sees every other one (MAR).


class KVCache:
    """Keys and values of every layer for the first `length` positions, filled as tokens arrive."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.length = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at positions [length, length + T) of `layer` (allocated max_len long on first use)
        -> keys and values (B, nh, length + T, hs) of every position so far. Transformer.forward advances length."""
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer], self.v[layer] = k.new_zeros(B, nh, self.max_len, hs), v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end], self.v[layer][:, :, self.length:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg, layer, causal=True):
        super().__init__()
        self.layer, self.n_head, self.dropout, self.causal = layer, cfg.n_head, cfg.dropout, causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, kv_cache=None):
        """Multi-head scaled dot-product attention of x (B, T, D), then proj. Causal: position i sees positions <= i;
        with a cache, the T new positions also see every cached one. Dropout on the attention weights in training."""
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)             # (B, nh, T, hs)
                   for t in self.qkv(x).split(D, dim=2))
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)                                         # (B, nh, past + T, hs)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)    # new i sees <= past + i
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg, layer, causal=True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, layer, causal)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Input embeddings (B, T, D) -> outputs (B, T, D); with a cache (causal), the T inputs follow the cached ones."""

    def __init__(self, cfg, block_size, causal=True):
        super().__init__()
        self.block_size, self.causal = block_size, causal
        self.position_embed = nn.Embedding(block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, causal) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)

    def forward(self, x, kv_cache=None):
        start = kv_cache.length if kv_cache is not None else 0
        x = x + self.position_embed(torch.arange(start, start + x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        return self.norm(x)


def gpt2_init(module, n_layer):
    """GPT-2's (nanoGPT): weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            residual = name.endswith((".attn.proj", ".mlp.2"))
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# The discrete prior p(d | y), LlamaGen's recipe: one causal sequence [y, d_1 .. d_N-1], the output at position j
# predicting d_(j+1) over the K codes; next-token cross-entropy in training, token by token with a KV cache in sampling.
# It is the `discrete` baseline and the first half of DisCon. For guidance, y is dropped for a learned null class.


def sample_token(logits, guidance, temperature, top_k, generator=None):
    """One token (B,) from logits (B, K), or guided (guidance != 1) from classifier_free_guidance of logits (2B, K),
    [:B] conditional; divided by temperature; top_k > 0 keeps the k (at most K) largest. One multinomial draw."""
    if guidance != 1:
        logits = classifier_free_guidance(*logits.chunk(2), guidance)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


class DiscretePrior(nn.Module):
    def __init__(self, cfg, num_tokens, codebook_size):
        super().__init__()
        self.cfg, self.num_tokens = cfg, num_tokens
        self.null_class = cfg.num_classes                                                 # the class "no class"
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.n_embd)                  # last row: the null class
        self.token_embed = nn.Embedding(codebook_size, cfg.n_embd)
        self.transformer = Transformer(cfg, num_tokens, causal=True)
        self.logits = nn.Linear(cfg.n_embd, codebook_size, bias=False)
        gpt2_init(self, cfg.n_layer)

    def embed(self, y, d, start=0, end=None):
        """Input embeddings (B, end - start, D) of positions [start, end) of the sequence: position 0 holds
        class_embed(y), position j >= 1 token_embed(d_j), d_j being column j - 1 of d (B, N). end defaults to N."""
        end = self.num_tokens if end is None else end
        parts = [self.class_embed(y)[:, None]] if start == 0 else []                      # (B, 1, D)
        if end > max(start, 1):
            parts.append(self.token_embed(d[:, max(start, 1) - 1:end - 1]))               # (B, ., D)
        return torch.cat(parts, dim=1)

    def forward(self, y, d, generator=None):
        """Next-token cross-entropy (a scalar) of the grids d (B, N) given labels y (B,). In training, each label is
        replaced by the null class with probability label_drop (one torch.rand draw of B values)."""
        if self.training and self.cfg.label_drop > 0:
            drop = torch.rand(len(y), generator=generator, device=y.device) < self.cfg.label_drop
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        logits = self.logits(self.transformer(self.embed(y, d)))                          # (B, N, K)
        return F.cross_entropy(logits.flatten(0, 1).float(), d.flatten())

    @torch.no_grad()
    def sample(self, y, guidance, temperature, top_k, generator=None, use_kv_cache=True):
        """d (B, N) for labels y (B,), one position at a time, each through sample_token(logits, guidance, temperature,
        top_k, generator). Guided (guidance != 1), the transformer runs on 2B rows: y, then the null class, both
        halves holding the tokens sampled so far. use_kv_cache=False re-embeds the whole prefix at every position."""
        B, N = len(y), self.num_tokens
        rows = y if guidance == 1 else torch.cat([y, torch.full_like(y, self.null_class)])
        d = torch.zeros(len(rows), N, dtype=torch.long, device=y.device)
        cache = KVCache(self.cfg.n_layer, N) if use_kv_cache else None
        for pos in range(N):  # the output at position pos predicts d_(pos + 1), column pos of d
            h = self.transformer(self.embed(rows, d, pos if use_kv_cache else 0, pos + 1), cache)[:, -1]  # (rows, D)
            d[:, pos] = sample_token(self.logits(h).float(), guidance, temperature, top_k, generator).repeat(
                len(rows) // B)
        return d[:B]


# ----------------------------------------------------------------------------------------------------------------------
# The continuous model p(c | d, y), MAR's masked autoregression. A bidirectional transformer over [y .. y, x_1 .. x_N]
# (y in P leading positions, MAR's buffer): x_i embeds c_i where it is known, a learned mask token where not, plus the
# embedding of d_i, the discrete token at i, so every position sees all of d (the paper's figure puts d first, as a
# prefix). Training hides a random subset of positions and applies the diffusion loss there; sampling reveals them in
# a random order, several at a time, the head sampling each step's tokens together. Without d this is MAR, the
# `continuous` baseline. For guidance, the condition is dropped as a whole (y and d): d alone nearly gives the class.


@torch.compiler.disable  # an integer from the host: torch.compile then never sees the ratio, a float that changes
def masked_count(num_tokens, generator=None):
    """ceil(N r), the masked positions of a training batch, r one draw of MAR's mask ratio N(1, 0.25^2) truncated to
    [0.7, 1], from one uniform draw (torch.rand, float64) through the normal's inverse CDF. Drawn on the host: a GPU
    generator seeds it from its seed and moving offset."""
    if generator is not None and generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(hash((generator.initial_seed(), generator.get_offset())) % 2 ** 63)
    low = torch.special.ndtr(torch.tensor((0.7 - 1) / 0.25, dtype=torch.float64))       # CDF at the cut, 0.115
    u = low + (0.5 - low) * torch.rand(1, generator=generator, dtype=torch.float64)
    return math.ceil(num_tokens * float(1 + 0.25 * torch.special.ndtri(u)))


def reveal_schedule(num_tokens, sampling_steps):
    """How many tokens each of S sampling steps reveals (MAR's cosine schedule), a list: after step k, floor(N cos(pi/2
    (k + 1) / S)) stay masked, within [1, masked - 1], none after the last. ValueError unless 1 <= S <= N."""
    if not 1 <= sampling_steps <= num_tokens:
        raise ValueError(f"sampling_steps must be in [1, {num_tokens}] (the tokens per image), got {sampling_steps}")
    masked, counts = num_tokens, []
    for k in range(sampling_steps):
        left = 0 if k == sampling_steps - 1 else max(1, min(masked - 1, math.floor(
            num_tokens * math.cos(math.pi / 2 * (k + 1) / sampling_steps))))
        counts.append(masked - left)
        masked = left
    return counts


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
        self.transformer = Transformer(cfg, cfg.class_tokens + num_tokens, causal=False)
        gpt2_init(self, cfg.n_layer)                                    # before the head, which keeps its own init
        nn.init.normal_(self.mask_token, std=0.02)                                        # MAR's init of its mask token
        self.diffusion_head = DiffusionHead(latent_channels, cfg.n_embd, cfg.head_width, cfg.head_depth)
        self.diffusion = GaussianDiffusion(cfg.num_timesteps)

    def embed(self, y, c, d, known):
        """Input embeddings (B, P + N, D): class_embed(y) at each of the P = class_tokens first positions, then for each
        position i latent_proj(c_i) where known (B, N) is true and mask_token where not, plus code_embed(d_i) when
        conditioned (d None otherwise)."""
        x = torch.where(known[..., None], self.latent_proj(c), self.mask_token)           # (B, N, D)
        if self.conditioned:
            x = x + self.code_embed(d)
        return torch.cat([self.class_embed(y)[:, None].expand(-1, self.cfg.class_tokens, -1).to(x.dtype), x], dim=1)

    def drop_condition(self, y, d, drop):
        """(y, d) with the rows where drop (B,) is true holding the null class and, when conditioned, null codes."""
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        if self.conditioned:
            d = torch.where(drop[:, None], torch.full_like(d, self.null_code), d)
        return y, d

    def forward(self, c, d, y, generator=None):
        """Diffusion loss of c (B, N, C) given d (B, N; None unconditioned) and y (B,) on n = masked_count(N) masked
        positions per image. Draws, in order: in training, the dropped condition (torch.rand, B values); the count
        (masked_count); the masked positions, the first n of a random order per image (torch.rand(B, N).argsort);
        the loss's. Its B n rows (masked c_i, their outputs) are tiled diffusion_batch_mul times (Tensor.repeat)."""
        B, N, C = c.shape
        if self.training and self.cfg.label_drop > 0:
            y, d = self.drop_condition(y, d, torch.rand(B, generator=generator, device=y.device) < self.cfg.label_drop)
        n = masked_count(N, generator)                                                    # masked positions per image
        hidden = torch.rand(B, N, generator=generator, device=c.device).argsort(dim=1)[:, :n]   # (B, n)
        known = torch.ones(B, N, dtype=torch.bool, device=c.device).scatter(1, hidden, False)
        h = self.transformer(self.embed(y, c, d, known))[:, self.cfg.class_tokens:]       # (B, N, D)
        z = h.gather(1, hidden[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)      # (B n, D)
        target = c.gather(1, hidden[..., None].expand(-1, -1, C)).flatten(0, 1)           # (B n, C)
        mul = self.cfg.diffusion_batch_mul
        return self.diffusion.loss(self.diffusion_head, target.repeat(mul, 1), z.repeat(mul, 1), generator)

    @torch.no_grad()
    def sample(self, y, d, guidance, temperature, sampling_steps, diffusion_steps, generator=None):
        """c (B, N, C) for labels y (B,) and grids d (B, N; None unconditioned). Draws, in order: a random order of
        the positions per image (torch.rand(B, N).argsort), then each step's sample_latent. Step k reveals the next
        reveal_schedule(N, sampling_steps)[k] positions of each order: one transformer pass given the known tokens,
        one sample_latent for all their outputs. Guided (guidance != 1), the pass has 2B rows, [B:] with the null class
        and codes (drop_condition) and the same known c; the scale ramps from 1 to `guidance` with the fraction of
        tokens known after the step (MAR's linear schedule)."""
        B, N, C = len(y), self.num_tokens, self.channels
        order = torch.rand(B, N, generator=generator, device=y.device).argsort(dim=1)     # (B, N) positions by turn
        c = torch.zeros(B, N, C, dtype=self.mask_token.dtype, device=y.device)
        known = torch.zeros(B, N, dtype=torch.bool, device=y.device)
        rows = 1 if guidance == 1 else 2
        if rows == 2:
            y, d = self.drop_condition(y.repeat(2), None if d is None else d.repeat(2, 1),
                                       torch.arange(2 * B, device=y.device) >= B)
        start = 0
        for count in reveal_schedule(N, sampling_steps):
            now = order[:, start:start + count]                                            # (B, count)
            x = self.embed(y, c.repeat(rows, 1, 1), d, known.repeat(rows, 1))
            h = self.transformer(x)[:, self.cfg.class_tokens:]                              # (rows B, N, D)
            z = h.gather(1, now.repeat(rows, 1)[..., None].expand(-1, -1, h.shape[-1]))    # (rows B, count, D)
            scale = 1 + (guidance - 1) * (start + count) / N
            latent = self.sample_latent(z.flatten(0, 1), scale, temperature, diffusion_steps, generator)
            c.scatter_(1, now[..., None].expand(-1, -1, C), latent.view(B, count, C))
            known.scatter_(1, now, True)
            start += count
        return c

    def sample_latent(self, z, guidance, temperature, diffusion_steps, generator=None):
        """One token (M, C) per condition z (M, D), or guided (guidance != 1) per row of z[:M] of z (2M, D), z[M:]
        unconditional: GaussianDiffusion.sample with the head's eps (classifier_free_guidance), the temperature and the
        clamp at clip_latent. The head's layers follow the caller's autocast; the chain, the weights' precision."""
        head = self.diffusion_head
        z_embedded = head.cond_embed(z)                                                   # fixed over the chain

        def eps_fn(x_t, t):  # one head call per diffusion step for all rows; every row is at the same t
            cond = head.embed_time(t[:1]) + z_embedded
            if guidance == 1:
                return head.predict(x_t, cond)
            eps = head.predict(torch.cat([x_t, x_t]), cond).to(x_t.dtype)                # mixed in the chain's dtype
            return classifier_free_guidance(*eps.chunk(2), guidance)

        M = len(z) if guidance == 1 else len(z) // 2
        return self.diffusion.sample(eps_fn, (M, self.channels), diffusion_steps, temperature, generator, z.device,
                                     self.mask_token.dtype, clip_x0=self.cfg.clip_latent)


# ----------------------------------------------------------------------------------------------------------------------
# DisCon: the frozen tokenizer, the prior p(d | y) and the continuous model p(c | d, y), trained side by side, sampled
# one after the other. The baselines keep one: `discrete` the prior (d decoded), `continuous` the model without d (MAR).


class DisCon(nn.Module):
    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.num_tokens = tokenizer.cfg.grid_size ** 2                                   # N
        # The prior is built first from the caller's seed, so a `discon` model's prior starts as the `discrete` one.
        if cfg.mode in ("discon", "discrete"):
            self.prior = DiscretePrior(cfg, self.num_tokens, tokenizer.cfg.codebook_size)
        if cfg.mode in ("discon", "continuous"):
            codes = tokenizer.cfg.codebook_size if cfg.mode == "discon" else None
            self.continuous = ContinuousModel(cfg, self.num_tokens, tokenizer.cfg.latent_channels, codes)
            reveal_schedule(self.num_tokens, cfg.sampling_steps)                          # sampling_steps fits the grid
        self.tokenizer = tokenizer.requires_grad_(False).eval()                          # frozen after stage 1

    def check_labels(self, y, batch=None):
        if y.dim() != 1 or y.dtype != torch.long or len(y) != (len(y) if batch is None else batch):
            raise ValueError(f"labels must be a 1-d long tensor of one label per image, got shape {tuple(y.shape)} "
                             f"and dtype {y.dtype}" + ("" if batch is None else f" for {batch} images"))
        if y.device.type == "cpu" and len(y) and (y.min() < 0 or y.max() >= self.cfg.num_classes):  # no GPU sync
            raise ValueError(f"labels must be in [0, {self.cfg.num_classes}), got values in [{int(y.min())}, "
                             f"{int(y.max())}]")

    def tokens(self, x):
        """Images, or a (c, d) pair from Tokenizer.encode -> c (B, N, C) and d (B, N), in raster order."""
        g, C = self.tokenizer.cfg.grid_size, self.tokenizer.cfg.latent_channels
        if isinstance(x, (tuple, list)):
            c, d = x
            if c.dim() != 4 or tuple(c.shape[1:]) != (C, g, g) or tuple(d.shape) != (c.shape[0], g, g):
                raise ValueError(f"c and d do not match this tokenizer: expected (B, {C}, {g}, {g}) and (B, {g}, {g}), "
                                 f"got {tuple(c.shape)} and {tuple(d.shape)}")
        else:
            c, d = self.tokenizer.encode(x)
        return c.flatten(2).transpose(1, 2), d.flatten(1)

    def forward(self, x, y, generator=None):
        """Training losses for images x (B, 3, H, W) in [-1, 1] or a (c, d) pair, and labels y (B,): "ce" of the
        prior, "diffusion" of the continuous model, their sum "loss". The prior draws first (as a `discrete` model)."""
        c, d = self.tokens(x)
        self.check_labels(y, len(d))
        terms = {}
        if hasattr(self, "prior"):
            terms["ce"] = self.prior(y, d, generator)
        if hasattr(self, "continuous"):
            terms["diffusion"] = self.continuous(c, d if self.cfg.mode == "discon" else None, y, generator)
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def generate(self, y, discrete_guidance=None, discrete_temperature=None, continuous_guidance=None,
                 continuous_temperature=None, sampling_steps=None, diffusion_steps=None, top_k=0, codes=None,
                 discrete_only=False, generator=None, use_kv_cache=True):
        """Images (B, 3, H, W) uint8 for labels y (B,): d from the prior, then c given d, then decode(c), in eval mode
        (the caller's restored after). Each setting is one phase's, None taking the config field of its name: the
        discrete ones go to DiscretePrior.sample with top_k (0: every code) and use_kv_cache, the continuous ones to
        ContinuousModel.sample; the prior draws from `generator` first. Discon mode only (else ValueError): codes, a
        grid d (B, h, w) to condition on, p(c | d, y) alone; discrete_only: decode_codes(d), the `discrete` baseline."""
        cfg, g = self.cfg, self.tokenizer.cfg.grid_size
        self.check_labels(y)
        if cfg.mode != "discon" and (codes is not None or discrete_only):
            raise ValueError(f"codes and discrete_only need a discon-mode model, this one is {cfg.mode!r}")
        if codes is not None and tuple(codes.shape) != (len(y), g, g):
            raise ValueError(f"codes must be a grid (B, {g}, {g}), got {tuple(codes.shape)}")
        pick = lambda value, default: default if value is None else value
        was_training = self.training
        self.eval()
        d = None if codes is None else codes.flatten(1).to(y.device)
        if d is None and hasattr(self, "prior"):
            d = self.prior.sample(y, pick(discrete_guidance, cfg.discrete_guidance),
                                  pick(discrete_temperature, cfg.discrete_temperature), top_k, generator, use_kv_cache)
        if cfg.mode == "discrete" or discrete_only:
            images = self.tokenizer.decode_codes(d.view(len(y), g, g))
        else:
            c = self.continuous.sample(y, d if cfg.mode == "discon" else None,
                                       pick(continuous_guidance, cfg.continuous_guidance),
                                       pick(continuous_temperature, cfg.continuous_temperature),
                                       pick(sampling_steps, cfg.sampling_steps),
                                       pick(diffusion_steps, cfg.diffusion_steps), generator)  # (B, N, C)
            images = self.tokenizer.decode(c.transpose(1, 2).reshape(len(y), -1, g, g))
        self.train(was_training)
        return to_uint8(images)

