"""Speed and memory of DisCon on this machine, printed as tables (the figures in README.md come from here).

    python bench.py                                   # CPU: quick and cifar10 presets, all three modes, KV cache, FID
    python bench.py --device cuda --bf16 --compile    # GPU, with a torch.compile'd training step
    python bench.py --device cuda --bf16 --presets cifar10 --modes discon --sample-batch 256,1024,4096

Each row runs in a fresh process, so its peak memory is its own: peak RSS on a CPU, peak allocated CUDA memory on a
GPU. Ratios are measured within one run, seconds apart. Sampling runs at each preset's own sampling defaults. FLOPs are
counted by torch.utils.flop_counter (matmuls, convolutions, attention) on one call; MFU is their rate against the
chip's peak, where it is known or given (--peak-tflops).
"""
import argparse
import multiprocessing as mp
import queue as queues
import resource
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import discon
import fid

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16 tensor-core peaks, NVIDIA's data sheets


def timed(fn, repeats):
    """Median wall time of fn() over max(repeats, 1) calls, after one warm-up call if repeats > 0."""
    if repeats:
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        if torch.cuda.is_available():  # queued kernels must not land in the next timed call
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build(preset, mode, device):
    tokenizer_fields, model_fields = discon.PRESETS[preset]
    torch.manual_seed(0)
    return discon.DisCon(discon.DisConConfig(mode=mode, **model_fields),
                         discon.Tokenizer(discon.TokenizerConfig(**tokenizer_fields))).to(device)


def measure_mode(args, preset, mode, queue):
    """One row: training images/s and TFLOP/s, sampling images/s at each sample batch, peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(preset, mode, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    size = model.tokenizer.cfg.image_size
    x = torch.rand(args.train_batch, 3, size, size, device=device) * 2 - 1
    y = torch.arange(args.train_batch, device=device) % model.cfg.num_classes
    tokens = model.tokenizer.encode(x)  # a stage-2 step sees pre-encoded latents (train.py's cache_latents)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_model = torch.compile(model) if args.compile else model

    def train_step(net=step_model):
        with autocast:
            loss = net(tokens, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sample(batch):
        labels = torch.arange(batch, device=device) % model.cfg.num_classes
        with autocast:
            model.generate(labels, diffusion_steps=args.diffusion_steps, generator=torch.Generator(device).manual_seed(0))

    # Counted eagerly: torch.compile would skip (for good) a function first called under the FLOP counter.
    train_flops = count_flops(lambda: train_step(model)) / args.train_batch  # forward and backward, per image
    train_ips = args.train_batch / timed(train_step, args.repeats)
    sample_ips = [batch / timed(lambda: sample(batch), 1) for batch in args.sample_batch]
    queue.put((train_ips, train_ips * train_flops / 1e12, sample_ips, peak_memory(device)))


def kv_cache_speedup(args, preset, mode, queue, batch=16):
    """Seconds of generate with the prior's KV cache, and recomputing the prefix at every token."""
    torch.set_num_threads(args.threads)
    model = build(preset, mode, torch.device(args.device)).eval()
    labels = torch.arange(batch, device=args.device) % model.cfg.num_classes
    run = lambda cache: model.generate(labels, use_kv_cache=cache, generator=torch.Generator(args.device).manual_seed(0))
    queue.put((timed(lambda: run(True), 2), timed(lambda: run(False), 2)))


def fid_speed(args, queue):
    """Inception feature extraction images/s, and the Frechet distance against pytorch-fid's scipy.linalg.sqrtm form."""
    import scipy.linalg
    model = fid.load_inception(args.fid_weights, device=args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.fid_images, 32, 32, 3), dtype=np.uint8)
    seconds = timed(lambda: fid.compute_features(images, model=model), 1)
    rng = np.random.default_rng(0)
    s1, s2 = (np.cov(rng.standard_normal((4096, 2048)), rowvar=False) for _ in range(2))
    ours = timed(lambda: fid.frechet_distance(np.zeros(2048), s1, np.zeros(2048), s2), 1)
    reference = timed(lambda: np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real), 1)
    queue.put((args.fid_images / seconds, reference / ours))


def in_fresh_process(what, target, *args):
    """target(*args, queue) in a new process -> what it puts on the queue. A process that dies first (out of memory,
    say) ends bench.py with its exit code, instead of a wait for ever."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    while True:
        exited = child.exitcode is not None  # read before the get: what it put before exiting is in the queue
        try:
            result = queue.get(timeout=1)
            break
        except queues.Empty:
            if exited:
                sys.exit(f"bench.py: the process measuring {what} died with exit code {child.exitcode}")
    child.join()
    return result


def names(known):
    """An argparse type: comma-separated names, each one of `known`, so that a typo fails before any measurement."""
    def parse(text):
        unknown = [name for name in text.split(",") if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: choose from {', '.join(known)}")
        return text.split(",")
    return parse


def sizes(text):
    """An argparse type: comma-separated positive integers, "256,1024" -> [256, 1024]."""
    values = [int(v) for v in text.split(",")]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return values


def make_parser():
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--presets", type=names(discon.PRESETS), default="quick,cifar10", help="comma-separated presets")
    p.add_argument("--modes", type=names(discon.MODES), default=",".join(discon.MODES), help="comma-separated modes")
    p.add_argument("--train-batch", type=int, default=32, help="images per timed training step")
    p.add_argument("--sample-batch", type=sizes, default=[10], help="comma-separated: a sampling column per batch size")
    p.add_argument("--diffusion-steps", type=int, default=None, help="the head's steps (default: the preset's)")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps (their median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="the table of cached against recomputed generation")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak TFLOP/s, for MFU")
    p.add_argument("--fid-images", type=int, default=64, help="images of the Inception rate; 0: no FID rows")
    p.add_argument("--fid-weights", default=None, help="Inception weights for fid.py (default: its download)")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"CPU, {args.threads} thread(s)"
    peak = args.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None)
    mfu = lambda tflops: f"{100 * tflops / peak:.1f}%" if peak else "-"
    print(f"# bench.py on {name}, torch {torch.__version__}, bf16={args.bf16}, compile={args.compile}; train batch "
          f"{args.train_batch}; diffusion steps {args.diffusion_steps or 'of the preset'}; peak {peak or '?'} TFLOP/s\n")
    columns = "".join(f" sample img/s (batch {batch}) |" for batch in args.sample_batch)
    print(f"| preset | mode | train img/s | train TFLOP/s | MFU |{columns} peak memory (MiB) |")
    print("|---|---|---|---|---|" + "---|" * len(args.sample_batch) + "---|")
    for preset in args.presets:
        for mode in args.modes:
            train_ips, tflops, sample_ips, memory = in_fresh_process(f"{preset}, {mode}", measure_mode, args, preset,
                                                                     mode)
            rates = "".join(f" {rate:.2f} |" for rate in sample_ips)
            print(f"| {preset} | {mode} | {train_ips:.1f} | {tflops:.3g} | {mfu(tflops)} |{rates} {memory:.0f} |",
                  flush=True)
    if args.kv_cache:
        print("\n| KV cache, batch 16 | cached (s) | recomputed (s) | speed-up |\n|---|---|---|---|")
        for preset in args.presets:
            for mode in [m for m in ("discrete", "discon") if m in args.modes]:
                fast, slow = in_fresh_process(f"the KV cache, {preset}", kv_cache_speedup, args, preset, mode)
                print(f"| {preset}, {mode} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x |", flush=True)
    if args.fid_images:
        images_per_s, speedup = in_fresh_process("FID", fid_speed, args)
        print("\n| FID | value |\n|---|---|")
        print(f"| Inception features, 32x32 uint8 -> 299 (images/s) | {images_per_s:.1f} |")
        print(f"| Frechet distance at 2048-d vs scipy.linalg.sqrtm | {speedup:.1f}x faster |")


if __name__ == "__main__":
    main()
