"""Speed and memory of DisCon on this machine, printed as one table (the figures in README.md come from here).

    python bench.py                       # CPU: quick and cifar10 presets, all three modes, KV cache, FID
    python bench.py --device cuda --bf16  # GPU; add --compile to time a torch.compile'd training step
    python bench.py --device cuda --bf16 --presets cifar10 --modes discon --sample-batch 256,1024,4096  # batch scaling

Each row runs in a fresh process, so its peak memory is its own: peak RSS on a CPU, peak allocated CUDA memory on a
GPU. Ratios are measured within one run, on the same machine, seconds apart. Sampling runs at generate()'s defaults
(the preset's config). FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions, attention) on one call;
the share of the chip's peak ("MFU") is printed where the peak is known or given (--peak-tflops).
"""
import argparse
import multiprocessing as mp
import queue as queues
import resource
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch

import discon
import fid
import train
from fid import positive


def timed(fn, repeats):
    """Median wall time of fn() over `repeats` calls (one call if 0), after one warm-up call (none if 0)."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    if torch.cuda.is_available():  # the warm-up's queued kernels must not land in the first timed call
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def count_flops(fn):
    """Floating-point operations of one call of fn, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16 tensor-core peaks, NVIDIA's data sheets


def peak_tflops(args):
    if args.peak_tflops or not args.device.startswith("cuda"):
        return args.peak_tflops
    name = torch.cuda.get_device_name(torch.device(args.device))
    return next((peak for chip, peak in PEAK_BF16_TFLOPS.items() if chip in name), None)


def share(tflops, peak):
    return f"{100 * tflops / peak:.1f}%" if peak else "-"


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build(preset, mode, device):
    _, tok_cfg, model_cfg = train.make_configs(["--preset", preset, "--mode", mode])
    torch.manual_seed(0)
    return discon.DisCon(model_cfg, discon.Tokenizer(tok_cfg)).to(device)


def measure_mode(args, preset, mode, queue):
    """One row: training images/s, sampling images/s at each sample batch, and peak memory of one preset in one mode."""
    if args.deterministic:
        train.make_deterministic()  # before anything touches the GPU
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(preset, mode, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    size = model.tokenizer.cfg.image_size
    x = torch.rand(args.train_batch, 3, size, size, device=device) * 2 - 1
    y = torch.arange(args.train_batch, device=device) % model.cfg.num_classes
    tokens = model.tokenizer.encode(x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_model = torch.compile(model) if args.compile else model

    def train_step():  # on pre-encoded tokens, as a training step of stage 2 sees them after the encoder
        with autocast:
            loss = step_model(tokens, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sample(batch):
        labels = torch.arange(batch, device=device) % model.cfg.num_classes
        with autocast:
            model.generate(labels, diffusion_steps=args.diffusion_steps, generator=torch.Generator(device).manual_seed(0))

    train_flops = count_flops(train_step) / args.train_batch  # forward and backward, per image
    train_ips = args.train_batch / timed(train_step, args.repeats)
    sample_ips = [batch / timed(lambda: sample(batch), 1) for batch in args.sample_batch]
    queue.put((train_ips, train_ips * train_flops / 1e12, sample_ips, peak_memory(device)))


def measure_sampling(args, preset, batch, graphs, head_bf16, queue):
    """One row of the sampling table: a discon-mode model under bf16 autocast (sample.py on a GPU), its diffusion head
    in bf16 or float32, its steps replayed from CUDA graphs or not -> images/s, TFLOP/s, peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(preset, "discon", device).eval()
    labels = torch.arange(batch, device=device) % model.cfg.num_classes

    def sample(n=batch, graphs=graphs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model.generate(labels[:n], diffusion_steps=args.diffusion_steps, head_autocast=head_bf16, graphs=graphs,
                           generator=torch.Generator(device).manual_seed(0))

    flops = count_flops(lambda: sample(min(batch, 8), graphs=False)) / min(batch, 8)  # per image, the same either way
    sample()  # the warm-up, where the graphs are captured
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = float(np.median([timed(sample, 0) for _ in range(max(1, args.repeats))]))
    queue.put((batch / seconds, batch / seconds * flops / 1e12, peak_memory(device)))


def in_fresh_process(what, target, *args):
    """target(*args, queue) in a new process -> what it puts on the queue. A process that dies first (a bad argument,
    out of memory) ends bench.py with its exit code, instead of a wait for ever on the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    while True:
        exited = child.exitcode is not None  # read before the get: what it put before exiting is in the queue by then
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


def batch_sizes(text):
    """An argparse type: comma-separated batch sizes, "256,1024" -> [256, 1024]."""
    return [positive(int)(size) for size in text.split(",")]


def kv_cache_speedup(args, preset, mode, batch=16, diffusion_steps=20):
    """Cached generation vs recomputing the whole prefix at each step."""
    torch.set_num_threads(args.threads)
    model = build(preset, mode, torch.device(args.device)).eval()
    labels = torch.arange(batch, device=args.device) % model.cfg.num_classes
    run = lambda cache: model.generate(labels, diffusion_steps=diffusion_steps, use_kv_cache=cache,
                                       generator=torch.Generator(args.device).manual_seed(0))
    fast, slow = timed(lambda: run(True), 2), timed(lambda: run(False), 2)
    return fast, slow


def load_previous_discon(rev):
    """discon.py as it was at git revision `rev`, imported as a module of its own."""
    import importlib.util, os, subprocess, sys, tempfile
    source = subprocess.run(["git", "show", f"{rev}:discon.py"], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    path = os.path.join(tempfile.mkdtemp(), "discon_previous.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("discon_previous", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["discon_previous"] = module
    spec.loader.exec_module(module)
    return module


def sampling_against(args, preset, mode, previous, batch):
    """Images/s of DisCon.generate, this version and `previous`, the same model size and batch, timed in turns in one
    process: at guidance 1 and 3 on both phases, then at each version's own sampling defaults (its config's guidance,
    temperatures and steps). Each version samples with its own default number of diffusion steps."""
    torch.set_num_threads(args.threads)
    _, tok_cfg, model_cfg = train.make_configs(["--preset", preset, "--mode", mode])
    models = []
    for module in (discon, previous):
        torch.manual_seed(0)
        # Only the fields a version knows; the previous one keeps its own sampling defaults.
        known = lambda config, cls, skip=(): {k: v for k, v in asdict(config).items()
                                              if k in {f.name for f in fields(cls)} and k not in skip}
        skip = discon.SAMPLING_FIELDS if module is previous else ()
        models.append(module.DisCon(module.DisConConfig(**known(model_cfg, module.DisConConfig, skip)),
                                    module.Tokenizer(module.TokenizerConfig(**known(tok_cfg, module.TokenizerConfig))))
                      .eval())
    labels = torch.arange(batch) % model_cfg.num_classes
    rates = []
    for guidance in (1.0, 3.0, None):  # None: each version's defaults
        seconds = [[], []]
        for _ in range(args.repeats):
            for i, model in enumerate(models):  # the second argument is the guidance scale in both versions
                seconds[i].append(timed(lambda: model.generate(labels, guidance,
                                                               generator=torch.Generator().manual_seed(0)), 0))
        rates.append([batch / float(np.median(s)) for s in seconds])
    return rates


def fid_speed(args):
    """Inception feature extraction images/s, and the Frechet distance against pytorch-fid's scipy.linalg.sqrtm form."""
    import scipy.linalg
    model = fid.load_inception(args.fid_weights, device=args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.fid_images, 32, 32, 3), dtype=np.uint8)
    seconds = timed(lambda: fid.compute_features(images, model=model, device=args.device), 1)
    rng = np.random.default_rng(0)
    s1, s2 = (np.cov(rng.standard_normal((4096, 2048)), rowvar=False) for _ in range(2))
    mu = np.zeros(2048)
    ours = timed(lambda: fid.frechet_distance(mu, s1, mu, s2), 1)
    reference = timed(lambda: np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real), 1)  # pytorch-fid's form
    return args.fid_images / seconds, reference / ours


def make_parser():
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=fid.HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--presets", type=names(train.PRESETS), default="quick,cifar10",
                        help="comma-separated presets of train.py")
    parser.add_argument("--modes", type=names(discon.MODES), default=",".join(discon.MODES), help="comma-separated modes")
    parser.add_argument("--train-batch", type=positive(int), default=32, help="images per timed training step")
    parser.add_argument("--sample-batch", type=batch_sizes, default="10",
                        help="comma-separated: one sampling column per batch size (e.g. 256,1024,4096)")
    parser.add_argument("--diffusion-steps", type=positive(int), default=None,
                        help="sampling steps (default: the preset's)")
    parser.add_argument("--repeats", type=positive(int, zero=True), default=3,
                        help="timed training steps (median); --against: timed turns")
    parser.add_argument("--threads", type=positive(int), default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--deterministic", action="store_true", help="train.py --deterministic's kernels")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="the table of cached against recomputed generation")
    parser.add_argument("--paths", action=argparse.BooleanOptionalAction, default=True,
                        help="the sampling table: eager or CUDA graphs, float32 or bf16 head, at each --sample-batch")
    parser.add_argument("--peak-tflops", type=positive(float), default=None,
                        help="the chip's peak TFLOP/s for the MFU columns (default: known GPUs' dense bf16 peak)")
    parser.add_argument("--against", default="", help="a git revision: time sampling against its discon.py")
    parser.add_argument("--fid-images", type=positive(int, zero=True), default=64, help="images of the Inception rate; 0: no FID rows")
    parser.add_argument("--fid-weights", default=None, help="Inception weights for fid.py (None: its download)")
    return parser


def main(argv=None):
    args = fid.parse_flags(make_parser(), argv)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print(f"# bench.py on {name}, torch {torch.__version__}, bf16={args.bf16}, compile={args.compile}, "
          f"deterministic={args.deterministic}")
    steps = args.diffusion_steps or "the preset's"
    peak = peak_tflops(args)
    print(f"# train batch {args.train_batch}, sample batch {','.join(map(str, args.sample_batch))} "
          f"(generate()'s defaults, {steps} diffusion steps); peak {peak or 'unknown'} TFLOP/s\n")

    columns = [f"sample img/s (batch {batch})" for batch in args.sample_batch]
    print(f"| preset | mode | train img/s | train TFLOP/s | MFU | {' | '.join(columns)} | peak memory (MiB) |")
    print("|---|---|---|---|---|" + "---|" * len(columns) + "---|")
    for preset in args.presets:
        for mode in args.modes:
            train_ips, tflops, sample_ips, memory = in_fresh_process(f"{preset}, {mode}", measure_mode, args, preset,
                                                                     mode)
            rates = " | ".join(f"{rate:.2f}" for rate in sample_ips)
            print(f"| {preset} | {mode} | {train_ips:.1f} | {tflops:.3g} | {share(tflops, peak)} | {rates} | "
                  f"{memory:.0f} |", flush=True)

    if args.paths:
        graphs = "CUDA graphs" if args.device.startswith("cuda") else "graph path (on a CPU: no graph, the copies)"
        print(f"\n| sampling, discon, bf16 autocast | batch | steps | head | img/s | TFLOP/s | MFU | "
              f"peak memory (MiB) |\n|---|---|---|---|---|---|---|---|")
    for preset in args.presets if args.paths else []:
        for batch in args.sample_batch:
            for use_graphs in (False, True):
                for head_bf16 in (False, True):
                    ips, tflops, memory = in_fresh_process(f"sampling, {preset}", measure_sampling, args, preset,
                                                           batch, use_graphs, head_bf16)
                    print(f"| {preset} | {batch} | {graphs if use_graphs else 'eager'} | "
                          f"{'bf16' if head_bf16 else 'float32'} | {ips:.2f} | {tflops:.3g} | {share(tflops, peak)} | "
                          f"{memory:.0f} |", flush=True)

    if args.kv_cache:
        print("\n| KV cache, batch 16 | cached (s) | recomputed (s) | speed-up |")
        print("|---|---|---|---|")
    for preset in args.presets if args.kv_cache else []:
        for mode in [m for m in ("discrete", "discon") if m in args.modes]:
            fast, slow = kv_cache_speedup(args, preset, mode)
            note = " (20 diffusion steps)" if mode == "discon" else ""
            print(f"| {preset}, {mode}{note} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x |", flush=True)

    if args.against:
        previous = load_previous_discon(args.against)
        print(f"\n| sampling at generate()'s defaults, batch {args.sample_batch[0]} | guidance | this version (img/s) "
              f"| {args.against} (img/s, {previous.DisConConfig.diffusion_steps} diffusion steps) | speed-up |\n"
              f"|---|---|---|---|---|")
        for preset in args.presets:
            steps = train.make_configs(["--preset", preset])[2].diffusion_steps
            for mode in args.modes:
                for guidance, (ours, theirs) in zip((1, 3, "each version's defaults"),
                                                    sampling_against(args, preset, mode, previous, args.sample_batch[0])):
                    print(f"| {preset} ({steps} diffusion steps), {mode} | {guidance} | {ours:.2f} | {theirs:.2f} | "
                          f"{ours / theirs:.2f}x |", flush=True)

    if args.fid_images:
        images_per_s, speedup = fid_speed(args)
        print("\n| FID | value |\n|---|---|")
        print(f"| Inception features, 32x32 uint8 -> 299 (images/s) | {images_per_s:.1f} |")
        print(f"| Frechet distance at 2048-d vs scipy.linalg.sqrtm | {speedup:.1f}x faster |")


if __name__ == "__main__":
    main()
