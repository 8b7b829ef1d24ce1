"""DisCon: discrete tokens as conditions for continuous autoregressive image generation, in one file.

A reference implementation of Zheng et al., "Rethinking Discrete Tokens: Treating Them as Conditions for Continuous
Autoregressive Image Synthesis" (arXiv 2507.01756, ICCV 2025). An image has two views of one latent grid: the discrete
VQ index grid d and the continuous latent grid c. The model samples d first, then c conditioned on d, and decodes
only c:

    p(c | y) = sum_d p(d | y) p(c | d, y)            y = class label

The file reads like the method: configs, tokenizer (c and d of one grid), Gaussian diffusion, diffusion head (p(c_i | .)
per token), causal transformer, DisCon (training losses), sampling. Two deliberate differences from the paper, both
explained in README.md: one tokenizer gives both views (the paper pairs VA-VAE with MaskGIT's VQGAN), and the continuous
stage is causal, in raster order, one token per step (the paper's figure shows a MAR-like random-order stage).
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MODES = ("discon", "continuous", "discrete")

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

    def __post_init__(self):
        levels = math.log2(self.downsample)
        if self.downsample < 2 or levels != int(levels):
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
    n_layer: int = 4                   # transformer size: chosen for the quick CPU preset; presets in train.py override
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0               # no dropout, as nanoGPT and MAR for their main models
    label_drop: float = 0.1            # classifier-free guidance label dropout, MAR's and LlamaGen's 0.1
    head_width: int = 256              # MAR's MLP head: width 1024, depth 3 (B); scaled down here
    head_depth: int = 3
    diffusion_batch_mul: int = 4       # MAR: each condition is trained on 4 (t, noise) pairs per step
    num_timesteps: int = 1000          # MAR / DDPM training steps
    diffusion_steps: int = 100         # respaced sampling steps, MAR's default
    clip_latent: float = 5.0           # sampling clamps the predicted clean c to +-this (c has unit std per channel);
                                       # ADM's clip_denoised. Without it the first respaced step amplifies the head's
                                       # eps error several hundred times (abar_999 = 2e-9) and samples diverge.

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


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
    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, ch_in // 4), ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(32, ch_out // 4), ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
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
        layers += [ResBlock(w[-1], w[-1]), nn.GroupNorm(min(32, w[-1] // 4), w[-1]), nn.SiLU()]
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
        layers += [nn.GroupNorm(min(32, w[-1] // 4), w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Tokenizer(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> continuous grid c (B, C, h, w) and discrete grid d (B, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
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
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)                                      # (B*h*w, C)
        codes = self.codebook.weight
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)  # (B*h*w, K)
        d = dist2.argmin(1)
        q = self.codebook(d).view(B, h, w, C).permute(0, 3, 1, 2)                        # (B, C, h, w)
        # VQ-VAE losses: the codebook term moves codes to the encoder outputs, the commitment term the other way.
        vq_loss = F.mse_loss(q, z.detach()) + self.cfg.commitment_weight * F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()  # straight-through: the forward value is q, the gradient goes to z unchanged
        return q_st, d.view(B, h, w), vq_loss

    @torch.no_grad()
    def restart_dead_codes(self, z, generator=None):
        """Move codes whose usage EMA fell below the threshold onto random encoder outputs of the whole batch (of every
        rank, gathered in rank order), so that the codebook does not depend on how the batch is split over ranks."""
        dead = self.code_usage < self.cfg.dead_code_threshold
        n_dead = int(dead.sum())  # the same on every rank: code_usage is all-reduced in update_usage
        if n_dead == 0:
            return
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if _distributed():
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, flat.contiguous())
            flat = torch.cat(parts)
        pick = torch.randint(0, len(flat), (n_dead,), generator=generator, device=flat.device)
        new_codes = flat[pick].to(self.codebook.weight.dtype)
        if _distributed():
            dist.broadcast(new_codes, src=0)  # every rank must hold the same codebook
        self.codebook.weight.data[dead] = new_codes
        self.code_usage[dead] = 1.0  # grace period before a restarted code can be declared dead again

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
        """Training loss of the tokenizer: a dict of named terms; "loss" is the one to backpropagate."""
        self.check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:  # before the noise: its draws must not depend on how the batch is split over processes
            self.restart_dead_codes(mean, generator)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        c = mean + torch.exp(0.5 * logvar) * noise  # sampled posterior: the continuous view
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

    @torch.no_grad()
    def encode(self, x):
        """Images -> (c, d): c the normalised posterior mean (B, C, h, w), d its nearest codes (B, h, w)."""
        self.check_images(x)
        mean = self.encoder(x)[:, : self.cfg.latent_channels]
        _, d, _ = self.quantize(mean)
        c = (mean - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)
        return c, d

    def decode(self, c):
        """Normalised continuous grid (B, C, h, w) -> images (B, 3, H, W), about [-1, 1]."""
        z = c * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)
        return self.decoder(z)

    def decode_codes(self, d):
        """Discrete grid (B, h, w) -> images: the reconstruction from the quantized view."""
        return self.decoder(self.codebook(d).permute(0, 3, 1, 2))

    @torch.no_grad()
    def fit_latent_stats(self, batches):
        """Set latent_mean/latent_std to the per-channel statistics of c over an iterable of image batches."""
        total, total_sq, count = 0.0, 0.0, 0
        for x in batches:
            x = x.to(self.latent_mean.device)
            self.check_images(x)
            mean = self.encoder(x)[:, : self.cfg.latent_channels].double()
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


class GaussianDiffusion:
    def __init__(self, num_timesteps=1000):
        self.num_timesteps = num_timesteps
        self.betas = cosine_betas(num_timesteps)                       # float64 tables, on the CPU
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self._chains = {}

    @staticmethod
    def _at(table, t, like):
        """table[t] shaped to broadcast against `like` (B, ...)."""
        return table.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.alphas_cumprod
        return self._at(abar.sqrt(), t, x0) * x0 + self._at((1 - abar).sqrt(), t, x0) * noise

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

    def sample(self, eps_fn, shape, steps, temperature=1.0, generator=None, device=None, dtype=torch.float32,
               clip_x0=None):
        """Ancestral sampling from N(0, I) with eps_fn(x_t, t) -> eps; the added noise is scaled by temperature (MAR).
        clip_x0 clamps each step's estimate of x0, which keeps an imperfect eps from blowing up at large t."""
        chain = self.respaced(steps)
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        for i in reversed(range(steps)):
            t = chain["timesteps"][i].to(device).expand(shape[0])
            eps = eps_fn(x, t).to(dtype)
            x0 = float(chain["sqrt_recip_abar"][i]) * x - float(chain["sqrt_recipm1_abar"][i]) * eps
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            x = float(chain["coef_x0"][i]) * x0 + float(chain["coef_xt"][i]) * x
            if i > 0:
                noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + math.exp(0.5 * float(chain["log_var"][i])) * temperature * noise
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
        cond = self.time_embed(timestep_embedding(t, self.frequency_dim).to(x_t.dtype)) + self.cond_embed(z)
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------------------------------
# Causal transformer: GPT-2 style pre-norm blocks (nanoGPT), learned absolute positions, and a KV cache so that
# sampling one more token attends to stored keys and values instead of recomputing the prefix.


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, kv_cache=None):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)            # (B, nh, T, hs)
                   for t in self.qkv(x).split(D, dim=2))
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)                                        # (B, nh, past + T, hs)
            # new position i sees every cached position and the new ones up to itself
            mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Input embeddings (B, T, D) -> outputs (B, T, D); with a cache, the T inputs continue the cached positions."""

    def __init__(self, cfg, block_size):
        super().__init__()
        self.block_size = block_size
        self.position_embed = nn.Embedding(block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)

    def new_cache(self):
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


# ----------------------------------------------------------------------------------------------------------------------
# DisCon. One causal sequence per image, [y, d_1 .. d_N, c_1 .. c_N] in raster order, without its last token (whose
# output would predict nothing). The output at position j predicts token j + 1: cross-entropy for the d's (p(d | y)),
# the diffusion loss for the c's (p(c | d, y)). The position whose output predicts c_i also carries an embedding of
# d_i, its aligned discrete token, so the head knows which mode c_i must fall in. The baselines drop one half:
# "continuous" is [y, c_1 .. c_N] (a causal MAR) and "discrete" is [y, d_1 .. d_N] (LlamaGen).


class DisCon(nn.Module):
    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        tcfg = tokenizer.cfg
        self.num_tokens = tcfg.grid_size ** 2                                              # N
        self.has_discrete = cfg.mode in ("discon", "discrete")
        self.has_continuous = cfg.mode in ("discon", "continuous")
        self.n_discrete = self.num_tokens if self.has_discrete else 0                     # positions before the c's

        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.n_embd)                  # last row: the null class
        if self.has_discrete:
            self.token_embed = nn.Embedding(tcfg.codebook_size, cfg.n_embd)
            self.logits = nn.Linear(cfg.n_embd, tcfg.codebook_size, bias=False)
        if self.has_continuous:
            self.latent_proj = nn.Linear(tcfg.latent_channels, cfg.n_embd)
        if cfg.mode == "discon":
            self.align_embed = nn.Embedding(tcfg.codebook_size, cfg.n_embd)
        block_size = self.n_discrete + self.num_tokens if cfg.mode == "discon" else self.num_tokens
        self.transformer = Transformer(cfg, block_size)
        for m in self.modules():  # GPT-2 init (nanoGPT): N(0, 0.02) for linear and embedding weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # Attached after the loop above, so that neither the trained codebook nor the head's zero-init is overwritten.
        self.tokenizer = tokenizer.requires_grad_(False).eval()                           # frozen after stage 1
        if self.has_continuous:
            self.diffusion_head = DiffusionHead(tcfg.latent_channels, cfg.n_embd, cfg.head_width, cfg.head_depth)
        self.diffusion = GaussianDiffusion(cfg.num_timesteps)

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
        if len(y) and (y.min() < 0 or y.max() >= self.cfg.num_classes):
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

    def embed(self, y, c, d, start=0, end=None):
        """Input embeddings of positions [start, end) of the sequence; tokens not needed there may hold anything."""
        parts = [self.class_embed(y)[:, None]]                                          # (B, 1, D)
        if self.has_discrete:
            parts.append(self.token_embed(d))                                           # (B, N, D)
        if self.has_continuous:
            parts.append(self.latent_proj(c))                                           # (B, N, D)
        x = torch.cat(parts, dim=1)[:, :-1]                                             # (B, L, D)
        if self.cfg.mode == "discon":  # positions N .. 2N-1 predict c_1 .. c_N: add their aligned d_1 .. d_N
            x = torch.cat([x[:, : self.n_discrete], x[:, self.n_discrete:] + self.align_embed(d)], dim=1)
        return x[:, start:end]

    # -- training --------------------------------------------------------------------------------------------------

    def forward(self, x, y, generator=None):
        """Training losses for images x (B, 3, H, W) in [-1, 1] or a (c, d) pair, and labels y (B,)."""
        c, d = self.tokens(x)
        B, N = d.shape
        self.check_labels(y, B)
        if self.training and self.cfg.label_drop > 0:  # classifier-free guidance: learn p(. | null class) too
            drop = torch.rand(B, generator=generator, device=y.device) < self.cfg.label_drop
            y = torch.where(drop, torch.full_like(y, self.cfg.num_classes), y)
        h = self.transformer(self.embed(y, c, d))                                        # (B, L, D)
        terms = {}
        if self.has_discrete:
            logits = self.logits(h[:, :N])                                               # (B, N, K)
            terms["ce"] = F.cross_entropy(logits.flatten(0, 1).float(), d.flatten())
        if self.has_continuous:
            z = h[:, self.n_discrete:].reshape(B * N, -1)                                # (B*N, D)
            target = c.reshape(B * N, -1)                                                # (B*N, C)
            mul = self.cfg.diffusion_batch_mul  # every condition gets `mul` independent (t, noise) draws
            terms["diffusion"] = self.diffusion.loss(self.diffusion_head, target.repeat(mul, 1), z.repeat(mul, 1),
                                                     generator)
        terms["loss"] = sum(terms.values())
        return terms

    # -- sampling --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, y, cfg=1.0, temperature=1.0, top_k=0, diffusion_steps=None, generator=None, use_kv_cache=True,
                 codes=None):
        """Sample images (B, 3, H, W) uint8 for labels y (B,): d token by token, then c token by token, then decode.

        cfg: guidance scale on the logits (phase 1) and on the head's eps (phase 2); 1 means no guidance.
        temperature: divides the logits, and scales the diffusion noise (MAR). top_k: 0 keeps every code.
        use_kv_cache=False recomputes the whole prefix at every step: the slow path the tests compare against.
        codes: "discon" mode only, a discrete grid (B, h, w) to condition on instead of sampling d: p(c | d, y) alone.
        """
        self.check_labels(y)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        g = self.tokenizer.cfg.grid_size
        if codes is not None and (self.cfg.mode != "discon" or tuple(codes.shape) != (len(y), g, g)):
            raise ValueError(f"codes must be a (B, {g}, {g}) grid for a discon-mode model, got {tuple(codes.shape)} "
                             f"in mode {self.cfg.mode!r}")
        was_training = self.training
        self.eval()
        B, N = len(y), self.num_tokens
        tcfg = self.tokenizer.cfg
        steps = diffusion_steps or self.cfg.diffusion_steps
        device, dtype = self.class_embed.weight.device, self.class_embed.weight.dtype
        guided = cfg != 1.0
        # With guidance the batch is doubled: rows [:B] see y, rows [B:] the null class; both share every sample.
        labels = torch.cat([y, torch.full_like(y, self.cfg.num_classes)]) if guided else y
        rows = len(labels)
        d = torch.zeros(rows, N, dtype=torch.long, device=device)
        c = torch.zeros(rows, N, tcfg.latent_channels, dtype=dtype, device=device)
        cache = self.transformer.new_cache() if use_kv_cache else None
        first = 0
        if codes is not None:  # the discrete phase is given: fill it in (and the cache) instead of sampling it
            d[:] = codes.flatten(1).repeat(rows // B, 1)
            first = self.n_discrete
            if use_kv_cache:
                self.transformer(self.embed(labels, c, d, end=first), cache)

        for pos in range(first, self.transformer.block_size):  # the output at `pos` predicts token pos + 1
            x = self.embed(labels, c, d, start=pos if use_kv_cache else 0, end=pos + 1)
            h = self.transformer(x, cache)[:, -1]                                        # (rows, D)
            if pos < self.n_discrete:
                token = self.sample_token(self.logits(h).float(), cfg, temperature, top_k, generator)
                d[:, pos] = token.repeat(rows // B)
            else:
                latent = self.sample_latent(h, cfg, temperature, steps, generator)
                c[:, pos - self.n_discrete] = latent.repeat(rows // B, 1)

        grid = (B, tcfg.grid_size, tcfg.grid_size)
        if self.cfg.mode == "discrete":
            images = self.tokenizer.decode_codes(d[:B].view(grid))
        else:
            images = self.tokenizer.decode(c[:B].transpose(1, 2).reshape(B, -1, *grid[1:]))
        self.train(was_training)
        return to_uint8(images)

    def sample_token(self, logits, cfg, temperature, top_k, generator):
        """One discrete token per image from logits (rows, K), rows = B or 2B with guidance."""
        if cfg != 1.0:
            logits = classifier_free_guidance(*logits.chunk(2), cfg)
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)   # (B,)

    def sample_latent(self, z, cfg, temperature, steps, generator):
        """One continuous token per image by running the diffusion head's reverse chain, conditioned on z (rows, D)."""
        B = len(z) // 2 if cfg != 1.0 else len(z)

        def eps_fn(x_t, t):  # one head call per diffusion step for the whole batch (both halves when guided)
            if cfg == 1.0:
                return self.diffusion_head(x_t, t, z)
            eps = self.diffusion_head(torch.cat([x_t, x_t]), torch.cat([t, t]), z)
            return classifier_free_guidance(*eps.chunk(2), cfg)

        shape = (B, self.tokenizer.cfg.latent_channels)
        dtype = self.class_embed.weight.dtype  # the chain runs in the weights' precision, even under autocast
        return self.diffusion.sample(eps_fn, shape, steps, temperature, generator, z.device, dtype,
                                     clip_x0=self.cfg.clip_latent)


def build_model(tokenizer_config, model_config):
    """Rebuild a DisCon model (with its tokenizer) from the config dicts saved in a checkpoint."""
    return DisCon(DisConConfig(**model_config), Tokenizer(TokenizerConfig(**tokenizer_config)))
