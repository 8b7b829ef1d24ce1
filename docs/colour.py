"""Where a tokenizer's reconstruction error goes, luminance or colour (docs/experiments.md: why the tokenizer was grey).

    python docs/colour.py out/tokenizer.pt           # both views of a trained tokenizer, raw and EMA weights
    python docs/colour.py --autoencoder no-norm-vp   # a plain autoencoder of the base-8 tokenizer's layers, 400 steps

The error of a reconstruction r of images x (both in [-1, 1]) is split at every pixel into its luminance part
(Rec. 601 weights) and the rest, its colour part. A grey reconstruction with the right luminance has a colour error of
mean |x - luminance(x)|, 0.199 on the shapes. Held-out images: 1000 fresh shapes of seed 5 (training uses seed 0).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import discon  # noqa: E402
import train  # noqa: E402

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def error_split(r, x):
    """-> (L1, luminance L1, colour L1) of reconstructions r against x."""
    err = r.clamp(-1, 1) - x
    luma = (err * LUMA).sum(1, keepdim=True)
    return err.abs().mean().item(), luma.abs().mean().item(), (err - luma).abs().mean().item()


def held_out():
    return train.to_model_input(train.make_shapes(1000, 32, seed=5)[0], "cpu", 32)


@torch.no_grad()
def report_tokenizer(path):
    ckpt = torch.load(path, map_location="cpu")
    x = held_out()
    grey = (x * LUMA).sum(1, keepdim=True).expand_as(x)  # the right luminance, no colour
    print(f"{path}: a grey reconstruction's colour error is {error_split(grey, x)[2]:.4f}")
    for weights in ("model", "ema"):
        tokenizer = discon.Tokenizer(discon.TokenizerConfig(**ckpt["config"]["tokenizer"]))
        tokenizer.load_state_dict(ckpt[weights])
        c, d = tokenizer.eval().encode(x)
        for view, r in (("continuous", tokenizer.decode(c)), ("discrete", tokenizer.decode_codes(d))):
            print(f"{weights:5s} {view:10s} view: L1 %.4f = luminance %.4f, colour %.4f" % error_split(r, x))


def train_autoencoder(variant, steps=400, batch=32, lr=3e-3):
    """The encoder and decoder of the base-8 quick tokenizer of git 6ed9d3e (downsample 8, 16 channels) as a plain
    autoencoder (no KL noise, no codebook), L1, AdamW: does colour get learnt? variant: as-is | no-norm | vp-init |
    no-norm-vp. As-is rebuilds the layers of before that change: GroupNorm (LDM's) and PyTorch's default conv init."""
    torch.manual_seed(0)
    cfg = discon.TokenizerConfig(base_channels=8, downsample=8, latent_channels=16)
    encoder, decoder = discon.Encoder(cfg), discon.Decoder(cfg)
    if variant in ("as-is", "vp-init"):  # put GroupNorm back where LDM's autoencoder has it
        for net in (encoder, decoder):
            add_group_norms(net)
    for m in list(encoder.modules()) + list(decoder.modules()):
        if isinstance(m, nn.Conv2d) and variant in ("vp-init", "no-norm-vp"):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            nn.init.zeros_(m.bias)
    images = train.to_model_input(train.make_shapes(4000, 32, seed=0)[0], "cpu", 32)
    x_held = held_out()
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step % 100 == 0:
            with torch.no_grad():
                r = decoder(encoder(x_held)[:, :16])
            print(f"{variant} step {step}: L1 %.4f = luminance %.4f, colour %.4f" % error_split(r, x_held), flush=True)
        x = images[torch.randint(0, len(images), (batch,), generator=generator)]
        loss = (decoder(encoder(x)[:, :16]) - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class NormedResBlock(nn.Module):
    """discon.ResBlock with LDM's GroupNorm before each activation: the tokenizer's block before this change."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        ch_in, ch_out = block.conv1.in_channels, block.conv1.out_channels
        self.norm1, self.norm2 = nn.GroupNorm(min(32, ch_in // 4), ch_in), nn.GroupNorm(min(32, ch_out // 4), ch_out)

    def forward(self, x):
        h = self.block.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = self.block.conv2(torch.nn.functional.silu(self.norm2(h)))
        return self.block.skip(x) + h


def add_group_norms(net):
    layers = []
    for layer in net.net:
        if isinstance(layer, discon.ResBlock):
            layer = NormedResBlock(layer)
        if isinstance(layer, nn.SiLU):  # the last SiLU of encoder and decoder had a GroupNorm before it
            channels = layers[-1].block.conv2.out_channels if isinstance(layers[-1], NormedResBlock) else None
            layers.append(nn.GroupNorm(min(32, channels // 4), channels))
        layers.append(layer)
    net.net = nn.Sequential(*layers)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", nargs="?", help="a tokenizer.pt of train.py")
    parser.add_argument("--autoencoder", choices=("as-is", "no-norm", "vp-init", "no-norm-vp"))
    args = parser.parse_args()
    if args.autoencoder:
        train_autoencoder(args.autoencoder)
    if args.tokenizer:
        report_tokenizer(args.tokenizer)
