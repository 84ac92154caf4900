"""Benchmark: one full training step (forward, backward, optimizer) at the playground size.

Variants, each timed step by step, interleaved round by round (A B C, C B A, ...) so that
load from other processes hits all of them alike; medians are reported, and ratios are
medians of per-round ratios:

- ours_fp32 / ours_bf16: the real `TrainRun.accumulate` + `TrainRun.optimizer_step` (the
  APT model, AdamW with its two parameter groups, token counting, clipping, the LR
  schedule) on fixed-length synthetic batches, fp32 and bf16 autocast;
- plain_fp32 / plain_bf16: a minimal causal transformer of the same shape written here,
  with the loop a user would write (AdamW, cross-entropy, backward, step);
- autopoietic: ours with the autopoietic attention, at the precision `train.precision:
  auto` picks on this machine.

It also measures the machine's matmul peak (large square matmuls, fp32 and bf16) for
MFU, and trains fp32 and bf16 side by side for `--curve-steps` steps from the same
initialisation on the same real batches (HLBD files, else the built-in generator),
comparing speed and loss.

Only torch (plus numpy, omegaconf, tqdm for the package) is needed: nothing here
imports Ray.

    python bench/step.py                      # full size: 3 minutes on 2 idle cores, more under load
    python bench/step.py --smoke --json       # seconds
    python bench/step.py --device cuda --variants ours_bf16 --curve-steps 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flops import flops_per_token

from bench_output import print_json, print_load
from hlbd_ray.config import Config, load_config
from hlbd_ray.data import Batch, EncodedSplit, PreparedData, iter_batches, prepare_data
from hlbd_ray.model import ModelSpec
from hlbd_ray.precision import resolve_precision
from hlbd_ray.session import LocalSession
from hlbd_ray.tokenizer import SPECIALS, TAGS, CharTokenizer
from hlbd_ray.train import TrainRun

HLBD_DATA = ["hlbd:full", "hlbd:hardcore"]  # the shipped HLBD Full V2 and Hardcore V2 files
VARIANTS = ("ours_fp32", "plain_fp32", "ours_bf16", "plain_bf16", "autopoietic")
Step = Callable[[], object]  # whatever it returns is dropped


# --- timing -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> float:
    """Wall seconds for one call, with the accelerator drained before and after."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def timed_cpu(step: Step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time does not advance while other
    processes hold the cores, so it shows how much of a slow step was only waiting."""
    cpu = time.process_time()
    wall = timed(step, device)
    return wall, time.process_time() - cpu


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow_i / fast_i: each pair ran back to back, so a burst of
    load from elsewhere mostly hits both sides of a pair, unlike a ratio of medians."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, sizes: list[int], reps: int) -> float:
    """Best GFLOP/s of square matmuls: the machine's practical peak for this dtype."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for i in range(reps + 2):
            seconds = timed(lambda: torch.matmul(a, b, out=out), device)  # noqa: B023 (called at once)
            if i >= 2:  # the first calls pay for allocation and kernel selection
                best = max(best, 2 * n ** 3 / seconds / 1e9)
    return best


def measure_peaks(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    if args.no_peak:
        return {}
    sizes = [256, 512] if args.smoke else ([4096, 8192] if device.type == "cuda" else [1024, 2048])
    reps = 3 if args.smoke else 10
    return {"fp32": matmul_peak_gflops(torch.float32, device, sizes, reps),
            "bf16": matmul_peak_gflops(torch.bfloat16, device, sizes, reps)}


# --- the plain reference: what a user would write ----------------------------------------


class PlainAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = PlainAttention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, d_ff, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def plain_step(args: argparse.Namespace, device: torch.device, batches: list[Batch], bf16: bool) -> Step:
    model = PlainGPT(args.vocab, args.seq, args.d_model, args.layers, args.heads, args.d_ff,
                     args.dropout).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    cursor = iter(range(10 ** 9))

    def step() -> None:
        b = batches[next(cursor) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(b.inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), b.labels.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# --- ours: the real TrainRun -------------------------------------------------------------


def synthetic_data(vocab: int, seq: int) -> PreparedData:
    """A vocabulary of `vocab` ids (specials, tags, then CJK characters) and a stub split:
    TrainRun needs the tokenizer and a train split to size its epoch, nothing else."""
    chars = "".join(chr(0x4E00 + i) for i in range(vocab - len(SPECIALS) - len(TAGS)))
    tokenizer = CharTokenizer.build([chars], max_vocab=vocab)
    split = EncodedSplit(np.zeros(4 * (seq + 1), dtype=np.int32), np.arange(0, 5 * (seq + 1), seq + 1),
                         np.ones(4, dtype=np.int32))
    return PreparedData(tokenizer.to_dict(), split, split, {})


def synthetic_batches(args: argparse.Namespace, device: torch.device, count: int = 4) -> list[Batch]:
    """Fixed-length batches of random non-special ids; every position carries a label."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        seq = torch.randint(len(SPECIALS) + len(TAGS), args.vocab, (args.batch, args.seq + 1), generator=gen)
        labels = seq[:, 1:].contiguous()
        answer = torch.ones_like(labels, dtype=torch.bool)   # no prompt: all of it is answer
        cut = torch.zeros(args.batch, dtype=torch.bool)
        out.append(Batch(seq[:, :-1].contiguous(), labels, answer, cut).to(device))
    return out


def ours_config(args: argparse.Namespace, precision: str, attention: str = "standard") -> Config:
    # The LR plan spans the fp32/bf16 curve: warmup, then one cosine that ends on its last
    # step. Epochs are only an upper bound here (the stub split is one step per epoch).
    steps = max(args.curve_steps, 40)
    return load_config(None, [
        f"train.epochs={steps}", f"train.max_steps={steps}",
        f"model.d_model={args.d_model}", f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}", f"model.d_ff={args.d_ff}", f"model.dropout={args.dropout}",
        f"model.attention={attention}", f"train.batch_size={args.batch}", "train.grad_accum=1",
        f"train.max_len={args.max_len}", f"train.precision={precision}",
        f"train.cpus_per_worker={args.threads}", "train.progress_bar=false",
        f"output_dir={tempfile.gettempdir()}"])


def ours_run(cfg: Config, data: PreparedData, device: torch.device) -> TrainRun:
    return TrainRun(cfg, data, LocalSession(tempfile.gettempdir(), device=device.type))


def ours_step(run: TrainRun, batches: list[Batch]) -> Step:
    cursor = iter(range(10 ** 9))

    def step() -> None:
        run.accumulate([batches[next(cursor) % len(batches)]])
        run.optimizer_step()

    return step


def group_step(run: TrainRun, group: list[Batch]) -> Step:
    """One optimizer step over the micro-batches of `group`."""
    def step() -> None:
        run.accumulate(group)
        run.optimizer_step()

    return step


# --- throughput: all variants interleaved ------------------------------------------------


def build_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Step]:
    data, batches = synthetic_data(args.vocab, args.seq), synthetic_batches(args, device)
    auto = resolve_precision("auto", device)
    makers: dict[str, Callable[[], Step]] = {
        "ours_fp32": lambda: ours_step(ours_run(ours_config(args, "fp32"), data, device), batches),
        "ours_bf16": lambda: ours_step(ours_run(ours_config(args, "bf16"), data, device), batches),
        "plain_fp32": lambda: plain_step(args, device, batches, bf16=False),
        "plain_bf16": lambda: plain_step(args, device, batches, bf16=True),
        "autopoietic": lambda: ours_step(ours_run(ours_config(args, auto, "autopoietic"), data, device),
                                         batches),
    }
    return {name: makers[name]() for name in args.variants}


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Step times per variant. Rounds alternate the order (A B C, C B A, ...) so no variant
    always runs right after the same neighbour; with --start-at every process of a
    concurrent run starts timing at the same moment and stops after --duration."""
    steps = build_steps(args, device)
    for step in steps.values():
        for _ in range(args.warmup):
            timed(step, device)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    start, rounds = time.perf_counter(), 0
    while (rounds < args.rounds) if not args.duration else (time.perf_counter() - start < args.duration):
        for name in order if rounds % 2 == 0 else reversed(order):
            w, c = timed_cpu(steps[name], device)
            wall[name].append(w)
            cpu[name].append(c)
        rounds += 1
    return {"wall": wall, "cpu": cpu}


# --- fp32 against bf16 on a real learning task -------------------------------------------


def group_stream(args: argparse.Namespace, data: PreparedData, device: torch.device) -> Iterator[list[Batch]]:
    epoch = 0
    while True:
        for batch in iter_batches(data.train, args.batch, seed=0, epoch=epoch, shuffle=True):
            yield [batch.to(device)]
        epoch += 1


def curve_data(args: argparse.Namespace) -> tuple[PreparedData, str]:
    paths = HLBD_DATA if not args.smoke else []
    cfg = load_config(None, [f"data.paths=[{','.join(paths)}]", f"train.max_len={args.max_len}",
                             f"data.generated_per_module={40 if args.smoke else 400}"])
    # The curves compare precisions at one fixed sequence length (the model's position
    # table), as BENCHMARKS.md records them: cut answers are part of that workload.
    data = prepare_data(cfg.data, cfg.train.max_len, allow_truncation=True)
    return data, ("HLBD files" if paths else "built-in generator")


def loss_curves(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """fp32 and bf16 runs from the same init on the same batches with the same dropout masks."""
    data, source = curve_data(args)
    vocab = len(data.build_tokenizer())
    runs = {p: ours_run(ours_config(args, p), data, device) for p in ("fp32", "bf16")}
    losses: dict[str, list[float]] = {p: [] for p in runs}
    times: dict[str, list[float]] = {p: [] for p in runs}
    cpu: dict[str, list[float]] = {p: [] for p in runs}
    tokens = 0
    for step, group in zip(range(args.curve_steps), group_stream(args, data, device)):
        tokens += sum(b.inputs.numel() for b in group)
        for p in runs if step % 2 == 0 else reversed(list(runs)):
            run = runs[p]
            torch.manual_seed(1000 + step)  # the same dropout masks for both precisions
            wall, cpu_s = timed_cpu(group_step(run, group), device)
            times[p].append(wall)
            cpu[p].append(cpu_s)
            w = run.window
            losses[p].append(sum(w.batch_loss_sums[-len(group):]) / max(sum(w.batch_tokens[-len(group):]), 1))
    tail = max(1, min(20, args.curve_steps // 10))  # the final loss: mean of the last steps
    final = {p: statistics.fmean(losses[p][-tail:]) for p in runs}
    val = {p: runs[p].evaluate()["val_loss"] for p in runs}
    # Paired per-step ratios: both precisions ran the same batch back to back.
    speedup = paired_ratio(times["fp32"], times["bf16"])
    return {"source": source, "vocab": vocab, "steps": args.curve_steps, "tail": tail,
            "losses": losses, "final": final, "val": val, "speedup": speedup,
            "cpu_speedup": paired_ratio(cpu["fp32"], cpu["bf16"]),
            "tokens_per_s": {p: tokens / sum(times[p]) for p in runs},
            "cpu_tokens_per_s": {p: tokens * args.threads / sum(cpu[p]) for p in runs}}


# --- report --------------------------------------------------------------------------------


def summarise(args: argparse.Namespace, device: torch.device, times: dict[str, dict[str, list[float]]],
              peaks: dict[str, float], curves: dict[str, Any] | None) -> dict[str, Any]:
    wall, cpu = times["wall"], times["cpu"]
    tokens = args.batch * args.seq
    spec = ModelSpec(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                     num_layers=args.layers, d_ff=args.d_ff, max_seq_len=args.max_len)
    flops = flops_per_token(spec, args.seq)
    r: dict[str, Any] = {"device": device.type, "threads": args.threads, "flops_per_token": flops,
                         "rounds": min((len(t) for t in wall.values()), default=0)}
    for name in wall:
        r[f"tokens_per_s_{name}"] = tokens / statistics.median(wall[name])
        # Throughput if the process had had its threads' cores to itself (CPU time / threads).
        r[f"cpu_tokens_per_s_{name}"] = tokens * args.threads / statistics.median(cpu[name])
    r.update({f"peak_gflops_{k}": v for k, v in peaks.items()})
    pairs = {"ratio_vs_plain": ("plain_fp32", "ours_fp32"), "ratio_vs_plain_bf16": ("plain_bf16", "ours_bf16"),
             "ours_bf16_vs_fp32": ("ours_fp32", "ours_bf16"),
             # A cost: step time of autopoietic over standard attention (2.0 = twice as slow),
             # at the precision `auto` picks here.
             "autopoietic_ratio": ("autopoietic", f"ours_{resolve_precision('auto', device)}")}
    for key, (slow, fast) in pairs.items():
        if slow in wall and fast in wall:
            r[key] = paired_ratio(wall[slow], wall[fast])
            r[f"cpu_{key}"] = paired_ratio(cpu[slow], cpu[fast])
    for p in ("fp32", "bf16"):
        if f"ours_{p}" in wall and peaks.get(p):
            r[f"mfu_{p}"] = r[f"tokens_per_s_ours_{p}"] * flops / (peaks[p] * 1e9)
    if curves:
        final, val = curves["final"], curves["val"]
        r["bf16_speedup"] = curves["speedup"]
        r["cpu_bf16_speedup"] = curves["cpu_speedup"]
        r["bf16_final_loss_rel_diff"] = abs(final["bf16"] - final["fp32"]) / final["fp32"]
        r["bf16_val_loss_rel_diff"] = abs(val["bf16"] - val["fp32"]) / val["fp32"]
        for p in ("fp32", "bf16"):
            r[f"curve_tokens_per_s_{p}"] = curves["tokens_per_s"][p]
            r[f"curve_cpu_tokens_per_s_{p}"] = curves["cpu_tokens_per_s"][p]
            r[f"curve_final_loss_{p}"] = final[p]
            r[f"curve_val_loss_{p}"] = val[p]
    return r


def print_report(args: argparse.Namespace, r: dict[str, Any], times: dict[str, dict[str, list[float]]],
                 curves: dict[str, Any] | None) -> None:
    print(f"\nstep: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, dropout {args.dropout}, "
          f"{r['device']}, {args.threads} threads, {r['rounds']} rounds (medians)")
    print(f"{'variant':14}{'tokens/s':>10}{'MFU':>8}{'cpu tok/s':>11}{'step ms min':>13}{'median':>8}{'max':>8}")
    for name in args.variants:
        tps = r[f"tokens_per_s_{name}"]
        peak = r.get("peak_gflops_bf16" if "bf16" in name else "peak_gflops_fp32")
        mfu = f"{tps * r['flops_per_token'] / (peak * 1e9):8.1%}" if peak else f"{'-':>8}"
        ms = sorted(t * 1e3 for t in times["wall"][name])
        print(f"{name:14}{tps:10.0f}{mfu}{r[f'cpu_tokens_per_s_{name}']:11.0f}"
              f"{ms[0]:13.0f}{statistics.median(ms):8.0f}{ms[-1]:8.0f}")
    for key in ("peak_gflops_fp32", "peak_gflops_bf16"):
        if key in r:
            print(f"{key:28}{r[key]:10.1f}")
    print(f"{'paired ratios (median)':28}{'wall':>10}{'cpu':>10}")
    for key in ("ratio_vs_plain", "ratio_vs_plain_bf16", "ours_bf16_vs_fp32", "autopoietic_ratio"):
        if key in r:
            print(f"{key:28}{r[key]:10.3f}{r[f'cpu_{key}']:10.3f}")
    if curves:
        print(f"\nfp32 vs bf16, {curves['steps']} steps on {curves['source']} (vocab {curves['vocab']}), "
              f"same init, batches and dropout masks")
        every = max(1, curves["steps"] // 10)
        print(f"{'step':>6}{'fp32 loss':>12}{'bf16 loss':>12}")
        for i in sorted(set(range(0, curves["steps"], every)) | {curves["steps"] - 1}):
            print(f"{i + 1:6d}{curves['losses']['fp32'][i]:12.4f}{curves['losses']['bf16'][i]:12.4f}")
        print(f"final loss (mean of last {curves['tail']} steps): fp32 {curves['final']['fp32']:.4f}, "
              f"bf16 {curves['final']['bf16']:.4f}, rel diff {r['bf16_final_loss_rel_diff']:.2%}")
        print(f"val loss after training: fp32 {curves['val']['fp32']:.4f}, bf16 {curves['val']['bf16']:.4f}, "
              f"rel diff {r['bf16_val_loss_rel_diff']:.2%}")
        print(f"tokens/s over all steps (padded): fp32 {r['curve_tokens_per_s_fp32']:.0f}, "
              f"bf16 {r['curve_tokens_per_s_bf16']:.0f} wall; fp32 {r['curve_cpu_tokens_per_s_fp32']:.0f}, "
              f"bf16 {r['curve_cpu_tokens_per_s_bf16']:.0f} cpu")
        print(f"bf16 speedup, median of paired steps: {r['bf16_speedup']:.2f}x wall, "
              f"{r['cpu_bf16_speedup']:.2f}x cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="training step throughput: ours vs a plain loop")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=128, help="train.max_len (position table size)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--duration", type=float, default=0.0, help="time rounds for this long instead")
    parser.add_argument("--start-at", type=float, default=0.0, help="unix time to start timing (concurrent runs)")
    parser.add_argument("--curve-steps", type=int, default=200, help="fp32 vs bf16 steps (0: skip)")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.smoke:
        args.d_model, args.layers, args.heads, args.d_ff, args.vocab = 64, 2, 4, 128, 500
        args.batch, args.seq, args.max_len = 4, 32, 64
        args.rounds, args.warmup, args.curve_steps = 3, 1, min(args.curve_steps, 10)
    return args


def main() -> None:
    args = parse_args()
    load_start = print_load("start")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peaks = measure_peaks(args, device)
    times = throughput(args, device)
    # Again after the steps, keeping the best: a burst of load during one pass only lowers it.
    peaks = {k: max(v, measure_peaks(args, device).get(k, 0.0)) for k, v in peaks.items()}
    curves = loss_curves(args, device) if args.curve_steps > 0 else None
    result = summarise(args, device, times, peaks, curves)
    print_report(args, result, times, curves)
    result["loadavg_start"], result["loadavg_end"] = load_start, print_load("end")
    if args.json:
        print_json(result)


if __name__ == "__main__":
    main()
