"""Plausible wrong versions of the exercises' functions, one at a time: does each row's command catch them?
(README.md, "Exercises"; docs/experiments.md, "Exercises: a mutation run".)

    python docs/mutants.py            # every mutant; prints each one caught or missed, and the count

Each mutant is one exact text replacement in a copy of discon.py or fid.py, then the command of its README row.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, FID = "discon.py", "fid.py"
MUTANTS = [  # (row, what, file, text, wrong text)
    (1, "argmax of distances", D, ").argmin(1)\n\n\nclass Tokenizer", ").argmax(1)\n\n\nclass Tokenizer"),
    (1, "distances in bf16 under autocast", D, "    with torch.autocast(z.device.type, enabled=False):\n        z, codes",
     "    with torch.autocast(z.device.type, enabled=True):\n        z, codes"),
    (1, "no straight-through", D, "return z + (q - z).detach(), d.view", "return q, d.view"),
    (1, "commitment weight on the codebook term", D,
     "F.mse_loss(q, z.detach()) + self.cfg.commitment_weight * F.mse_loss(z, q.detach())",
     "self.cfg.commitment_weight * F.mse_loss(q, z.detach()) + F.mse_loss(z, q.detach())"),
    (1, "codes reshaped without the permute", D, "q = self.codebook(d).view(B, h, w, C).permute(0, 3, 1, 2)",
     "q = self.codebook(d).view(B, C, h, w)"),
    (2, "restart every code", D, "self.codebook.weight.data.copy_(torch.where(dead[:, None], candidates,",
     "self.codebook.weight.data.copy_(torch.where(torch.ones_like(dead)[:, None], candidates,"),
    (2, "no grace period", D, "torch.where(dead, torch.ones_like(self.code_usage), self.code_usage)",
     "self.code_usage"),
    (2, "candidates from the global RNG", D,
     "pick = torch.randint(0, len(flat), (self.cfg.codebook_size,), generator=generator, device=flat.device)",
     "pick = torch.randint(0, len(flat), (self.cfg.codebook_size,), device=flat.device)"),
    (2, "usage EMA with the weights swapped", D,
     "self.code_usage.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)",
     "self.code_usage.mul_(1 - self.cfg.usage_decay).add_(counts, alpha=self.cfg.usage_decay)"),
    (2, "perplexity without the exp", D, "return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()),",
     "return -(probs * torch.log(probs.clamp_min(1e-10))).sum(),"),
    (3, "KL without the log-variance term", D, "0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()",
     "0.5 * (mean.pow(2) + logvar.exp() - 1).mean()"),
    (3, "std where the variance goes", D, "c = mean + torch.exp(0.5 * logvar) * noise()",
     "c = mean + torch.exp(logvar) * noise()"),
    (3, "decoder noise not scaled by c's std", D, "c = c + self.cfg.decoder_noise * scale * noise()",
     "c = c + self.cfg.decoder_noise * noise()"),
    (3, "the discrete view quantized from the sample", D, "q, d, vq_loss = self.quantize(mean)",
     "q, d, vq_loss = self.quantize(c)"),
    (3, "dead codes restarted in eval mode too", D, "        if self.training:  # before the noise",
     "        if True:  # before the noise"),
    (4, "std with Bessel's correction", D, "(total_sq / count - mu.pow(2)).clamp_min(1e-12).sqrt()",
     "(total_sq / (count - 1) - mu.pow(2)).clamp_min(1e-12).sqrt()"),
    (5, "the schedule one step off", D, "min(1 - f(i + 1) / f(i), max_beta)", "min(1 - f(i + 2) / f(i + 1), max_beta)"),
    (5, "no clipping", D, "min(1 - f(i + 1) / f(i), max_beta)", "1 - f(i + 1) / f(i)"),
    (6, "sqrt(abar) on the noise", D, "+ self.sqrt_one_minus_abar[t].to(x0.dtype)[:, None] * noise)",
     "+ self.sqrt_abar[t].to(x0.dtype)[:, None] * noise)"),
    (7, "t from 1 to T", D, "t = torch.randint(0, self.num_timesteps, (len(x0),)",
     "t = torch.randint(1, self.num_timesteps + 1, (len(x0),)"),
    (7, "noise drawn before t", D,
     "        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=generator, device=x0.device)\n"
     "        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)",
     "        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)\n"
     "        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=generator, device=x0.device)"),
    (7, "the loss against x0", D, "t, cond).float(), noise.float())", "t, cond).float(), x0.float())"),
    (8, "respacing without rounding", D, "torch.linspace(self.num_timesteps - 1, 0, diffusion_steps).round().long()",
     "torch.linspace(self.num_timesteps - 1, 0, diffusion_steps).long()"),
    (8, "no clamp", D, "                x0 = x0.clamp(-clip_x0, clip_x0)", "                x0 = x0"),
    (8, "temperature on x_T too", D, "        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)\n",
     "        x = temperature * torch.randn(shape, generator=generator, device=device, dtype=dtype)\n"),
    (8, "noise at the last step too", D, "            if i > 0:\n                noise", "            if True:\n                noise"),
    (8, "the diffusion steps ignored", D, "chain = {k: v.tolist() for k, v in self.respaced(diffusion_steps).items()}",
     "chain = {k: v.tolist() for k, v in self.respaced(self.num_timesteps).items()}"),
    (8, "the variance where its log goes", D, "temperature * math.exp(0.5 * chain[\"log_var\"][i]) * noise",
     "temperature * math.exp(chain[\"log_var\"][i]) * noise"),
    (9, "sin before cos", D, "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)"),
    (9, "no gate", D, "return x + gate * self.mlp(", "return x + self.mlp("),
    (9, "scale without the 1 +", D, "h = block(h, cond)\n        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)\n"
     "        return self.output(self.final_norm(h) * (1 + scale) + shift)",
     "h = block(h, cond)\n        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)\n"
     "        return self.output(self.final_norm(h) * scale + shift)"),
    (10, "returns only the new keys", D, "return self.k[layer][:, :, :end], self.v[layer][:, :, :end]", "return k, v"),
    (10, "stores at position 0", D, "self.k[layer][:, :, self.length:end], self.v[layer][:, :, self.length:end] = k, v",
     "self.k[layer][:, :, :end - self.length], self.v[layer][:, :, :end - self.length] = k, v"),
    (10, "causal where bidirectional", D, "is_causal=self.causal, dropout_p", "is_causal=True, dropout_p"),
    (10, "the cache mask without its offset", D, ".tril(past)", ".tril()"),
    (10, "heads merged without the transpose", D, "return self.proj(y.transpose(1, 2).reshape(B, T, D))",
     "return self.proj(y.reshape(B, T, D))"),
    (10, "dropout in eval mode", D, "dropout = self.dropout if self.training else 0.0", "dropout = self.dropout"),
    (11, "targets shifted", D, "return F.cross_entropy(logits.flatten(0, 1).float(), d.flatten())",
     "return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), d[:, 1:].flatten())"),
    (11, "the sequence ends with the last code", D, "self.token_embed(d[:, max(start, 1) - 1:end - 1])",
     "self.token_embed(d[:, max(start, 1):end])"),
    (11, "label dropout in eval mode", D, "        if self.training and self.cfg.label_drop > 0:\n            drop",
     "        if self.cfg.label_drop > 0:\n            drop"),
    (11, "label dropout from the global RNG", D,
     "drop = torch.rand(len(y), generator=generator, device=y.device) < self.cfg.label_drop",
     "drop = torch.rand(len(y), device=y.device) < self.cfg.label_drop"),
    (12, "temperature multiplies", D, "logits = logits / temperature", "logits = logits * temperature"),
    (12, "top-k keeps k - 1", D, "logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
     "logits = logits.masked_fill(logits <= kth, float(\"-inf\"))"),
    (12, "guidance anchored at the conditional", D, "return uncond + scale * (cond - uncond)",
     "return cond + scale * (cond - uncond)"),
    (12, "multinomial from the global RNG", D, "torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)",
     "torch.multinomial(F.softmax(logits, dim=-1), 1)"),
    (13, "the unconditional rows keep the class", D,
     "rows = y if guidance == 1 else torch.cat([y, torch.full_like(y, self.null_class)])",
     "rows = y if guidance == 1 else torch.cat([y, y])"),
    (13, "temperature not passed on", D,
     "sample_token(self.logits(h).float(), guidance, temperature, top_k, generator)",
     "sample_token(self.logits(h).float(), guidance, 1.0, top_k, generator)"),
    (13, "top-k not passed on", D, "sample_token(self.logits(h).float(), guidance, temperature, top_k, generator)",
     "sample_token(self.logits(h).float(), guidance, temperature, 0, generator)"),
    (13, "the token from the first output", D, "cache)[:, -1]  # (rows, D)", "cache)[:, 0]  # (rows, D)"),
    (14, "a uniform ratio", D, "return math.ceil(num_tokens * float(1 + 0.25 * torch.special.ndtri(u)))",
     "return math.ceil(num_tokens * float(0.7 + 0.3 * torch.rand(1, generator=generator, dtype=torch.float64)))"),
    (14, "the sign flipped", D, "return math.ceil(num_tokens * float(1 + 0.25 * torch.special.ndtri(u)))",
     "return math.ceil(num_tokens * float(1 - 0.25 * torch.special.ndtri(u)))"),
    (14, "floor for ceil", D, "return math.ceil(num_tokens * float(1 + 0.25 * torch.special.ndtri(u)))",
     "return math.floor(num_tokens * float(1 + 0.25 * torch.special.ndtri(u)))"),
    (14, "from the global RNG", D, "u = low + (0.5 - low) * torch.rand(1, generator=generator, dtype=torch.float64)",
     "u = low + (0.5 - low) * torch.rand(1, dtype=torch.float64)"),
    (15, "the cosine one step off", D, "math.cos(math.pi / 2 * (k + 1) / sampling_steps)",
     "math.cos(math.pi / 2 * k / sampling_steps)"),
    (15, "ceil for floor", D, "max(1, min(masked - 1, math.floor(", "max(1, min(masked - 1, math.ceil("),
    (16, "the codes only where c is known", D, "x = torch.where(known[..., None], self.latent_proj(c), self.mask_token)"
     "           # (B, N, D)\n        if self.conditioned:\n            x = x + self.code_embed(d)",
     "x = torch.where(known[..., None], self.latent_proj(c), self.mask_token)           # (B, N, D)\n"
     "        if self.conditioned:\n            x = x + self.code_embed(d) * known[..., None]"),
    (16, "the unconditional rows keep d", D,
     "            d = torch.where(drop[:, None], torch.full_like(d, self.null_code), d)", "            d = d"),
    (17, "a ratio for the count", D, "n = masked_count(N, generator)", "n = int(0.85 * N)"),
    (17, "the loss on the known positions", D, "hidden = torch.rand(B, N, generator=generator, device=c.device)"
     ".argsort(dim=1)[:, :n]", "hidden = torch.rand(B, N, generator=generator, device=c.device).argsort(dim=1)[:, n:]"),
    (17, "targets and conditions paired wrongly", D,
     "target = c.gather(1, hidden[..., None].expand(-1, -1, C)).flatten(0, 1)",
     "target = c.gather(1, hidden.flip(1)[..., None].expand(-1, -1, C)).flatten(0, 1)"),
    (17, "copies interleaved", D, "target.repeat(mul, 1), z.repeat(mul, 1)",
     "target.repeat_interleave(mul, 0), z.repeat_interleave(mul, 0)"),
    (17, "the condition dropped in eval mode", D,
     "        if self.training and self.cfg.label_drop > 0:\n            y, d = self.drop_condition",
     "        if self.cfg.label_drop > 0:\n            y, d = self.drop_condition"),
    (17, "the mask order from the global RNG", D, "hidden = torch.rand(B, N, generator=generator, device=c.device)",
     "hidden = torch.rand(B, N, device=c.device)"),
    (17, "the class output as a token's", D, "h = self.transformer(self.embed(y, c, d, known))[:, self.cfg.class_tokens:]",
     "h = self.transformer(self.embed(y, c, d, known))[:, self.cfg.class_tokens - 1:-1]"),
    (16, "the class in the first position only", D, ".expand(-1, self.cfg.class_tokens, -1)",
     ".expand(-1, self.cfg.class_tokens, -1) * (torch.arange(self.cfg.class_tokens, device=y.device) == 0)[:, None]"),
    (18, "the eps halves swapped", D, "return classifier_free_guidance(*eps.chunk(2), guidance)",
     "return classifier_free_guidance(*eps.chunk(2)[::-1], guidance)"),
    (18, "the chain at temperature 1", D, "(M, self.channels), diffusion_steps, temperature, generator",
     "(M, self.channels), diffusion_steps, 1.0, generator"),
    (18, "no clamp", D, "clip_x0=self.cfg.clip_latent)", "clip_x0=None)"),
    (19, "guidance not ramped", D, "scale = 1 + (guidance - 1) * (start + count) / N", "scale = guidance"),
    (19, "ramped on the tokens before the step", D, "scale = 1 + (guidance - 1) * (start + count) / N",
     "scale = 1 + (guidance - 1) * start / N"),
    (19, "the known mask never updated", D, "            known.scatter_(1, now, True)\n", ""),
    (19, "an off-by-one order slice", D, "now = order[:, start:start + count]", "now = order[:, start + 1:start + count + 1]"),
    (19, "the unconditional rows keep their class", D, "torch.arange(2 * B, device=y.device) >= B)",
     "torch.zeros(2 * B, dtype=torch.bool, device=y.device))"),
    (19, "the order from the global RNG", D, "order = torch.rand(B, N, generator=generator, device=y.device)",
     "order = torch.rand(B, N, device=y.device)"),
    (20, "the guidance of one phase for both", D, "pick(continuous_guidance, cfg.continuous_guidance)",
     "pick(discrete_guidance, cfg.discrete_guidance)"),
    (20, "the temperature of one phase for both", D, "pick(continuous_temperature, cfg.continuous_temperature)",
     "pick(discrete_temperature, cfg.continuous_temperature)"),
    (20, "discrete_only ignored", D, "if cfg.mode == \"discrete\" or discrete_only:", "if cfg.mode == \"discrete\":"),
    (20, "c reshaped without its transpose", D, "images = self.tokenizer.decode(c.transpose(1, 2).reshape(",
     "images = self.tokenizer.decode(c.reshape("),
    (20, "no eval mode", D, "        self.eval()\n        d = None", "        d = None"),
    (20, "the slow-path flag not passed", D, "top_k, generator, use_kv_cache)", "top_k, generator, True)"),
    (20, "given codes ignored", D, "d = None if codes is None else codes.flatten(1).to(y.device)", "d = None"),
    (21, "covariance with 1/n", FID, "return features.mean(0), np.cov(features, rowvar=False)",
     "return features.mean(0), np.cov(features, rowvar=False, bias=True)"),
    (21, "the trace term without the square roots", FID, "tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2)"
     ".clip(min=0)).sum()", "tr_covmean = np.linalg.eigvalsh((m + m.T) / 2).clip(min=0).sum()"),
    (21, "sqrt(S1) without its eigenvectors' transpose", FID, "sqrt_s1 = (v * np.sqrt(w.clip(min=0))) @ v.T",
     "sqrt_s1 = (v * np.sqrt(w.clip(min=0))) @ v"),
    (22, "p(y) over all images, not per split", FID, "log_py = scipy.special.logsumexp(part, axis=0) - np.log(len(part))",
     "log_py = scipy.special.logsumexp(log_p, axis=0) - np.log(len(log_p))"),
    (22, "the KL's sign flipped", FID, "(np.exp(part) * (part - log_py))", "(np.exp(part) * (log_py - part))"),
]


def command_keys():
    """{row: -k key} from README's exercise table."""
    table = re.findall(r"^\| (\d+) \|.*`python -m pytest -q test_discon.py -k (\w+)`", open(os.path.join(
        REPO, "README.md")).read(), re.M)
    return {int(n): key for n, key in table}


def main():
    keys, missed = command_keys(), []
    with tempfile.TemporaryDirectory() as copy:
        for name in ("discon.py", "fid.py", "data.py", "train.py", "sample.py", "bench.py", "test_discon.py",
                     "README.md"):
            shutil.copy(os.path.join(REPO, name), copy)
        for row, what, path, text, wrong in MUTANTS:
            source = open(os.path.join(REPO, path)).read()
            if source.count(text) != 1:
                sys.exit(f"row {row}, {what}: the text to replace is not once in {path}")
            with open(os.path.join(copy, path), "w") as f:
                f.write(source.replace(text, wrong))
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   "test_discon.py", "-k", keys[row]], cwd=copy, capture_output=True, text=True)
            shutil.copy(os.path.join(REPO, path), copy)
            caught = done.returncode != 0
            missed += [] if caught else [(row, what)]
            print(f"row {row:>2} {'caught' if caught else 'MISSED'}: {what}", flush=True)
    print(f"{len(MUTANTS) - len(missed)} of {len(MUTANTS)} caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
