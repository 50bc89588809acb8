"""Training and evaluation throughput of whole models, ours next to the usual stack, in one run.

    python bench/throughput.py --quick                        # CPU: tiny shapes, a few minutes
    python bench/throughput.py --out "$OUT" --time-budget 200 # GPU: the paper's models

For each model at its real shape with random weights, on the 2,000 frozen CN poems in the plain
format (tiny-tokenizer ids for the tiny presets; random ids of the same lengths and prompt/target
split for real vocabularies):
  ours    packed padding-free batches (engine.packing: 16,384 tokens a step on a GPU, 512 on the CPU),
          engine.train.train_step (fused kernels on the GPU, fp32 master weights, our AdamW, clipping),
          greedy_generate with no EOS (KV cache, CUDA graphs) for evaluation;
  theirs  transformers' AutoModelForCausalLM from the same config (bf16 on the GPU, fp32 on the CPU,
          its default attention: sdpa, eager for BLOOM), the same examples per step right-padded to
          the longest (attention mask, labels -100 on pads and prompts; split into micro-batches when
          it does not fit), torch.optim.AdamW (fused on CUDA, states in the parameters' dtype),
          clip_grad_norm_; evaluation with model.generate on the left-padded prompts. Also timed on
          shuffled batches (the same sequences per step in random order, what a shuffling DataLoader
          gives), because our best-fit packer groups similar lengths, so our batches carry little padding;
  liger   theirs with liger_kernel's apply_liger_kernel_to_qwen2 (GPU, Qwen2 only, when installed), right
          after the model's own runs.
Transformers (and Liger, which patches its classes) run in processes of their own
(bench/transformers_side.py): our `kernels` package is not Hugging Face's, which transformers 5
imports, and each side's peak memory stays its own.

Reported: training tokens/s (real tokens, pads not counted; median over steps), MFU (FLOPs per
token from engine.costs = 6N + 12 L H ctx, N = the matmul parameters with a tied output matrix
once, ctx = the mean causal context a token attends to) against the datasheet bf16 peak (null on
the CPU) and against a matmul ceiling measured in the same run (bf16 8192^3; fp32 1024^3 on the
CPU), the step split into forward / backward / optimizer (a separate pass with a device sync
around each phase; our "forward" also computes the output layer's gradients, which the fused
cross-entropy does in its forward), peak memory (GPU: max_memory_allocated; CPU: peak resident
memory above the process before the model was built, sampled every 2 ms), evaluation tokens/s
(new tokens, prefill included) and its achieved GB/s (weights once per decode step plus the KV
cache read; prefill included, so a lower bound of the decode loop's).

On a known GPU each model's step split is also modeled (engine/roofline.py at the measured batches'
tokens and sequence length, on the card's ceilings) and printed next to the measured one.

Writes under --out throughput-<device>.json (the schema cli.py profile reads: device, peak_tflops,
matmul_tflops, models.{name}.{params, train_tokens_per_second, mfu, step_seconds.{forward,
backward, optimizer}, modeled_step_seconds (same keys; null off a known GPU), peak_memory_bytes,
eval_tokens_per_second, eval_gb_per_second, baseline, ratio.{train, eval}}; partial.{name}: the
parts measured so far of a model still running or cut short), throughput-<device>.md and
throughput-<device>-detail.json (per-step times, FLOPs/token, shuffled baseline, Liger, MFU vs the
matmul ceiling, the host's time to pack an epoch, errors, skipped models). The files are rewritten
the moment each part of a model (our training, our evaluation, theirs) is measured.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_generate, common  # noqa: E402
from bench.transformers_side import TransformersSide  # noqa: E402
from engine.costs import train_flops  # noqa: E402
from engine.data import Example, encode_examples, load_poems  # noqa: E402
from engine.generate import greedy_generate  # noqa: E402
from engine.optim import AdamW, parameter_groups  # noqa: E402
from engine.packing import PackedBatch, collate, pack  # noqa: E402
from engine.roofline import stage_seconds  # noqa: E402
from engine.train import train_step  # noqa: E402
from models import REGISTRY, ModelConfig, build_model, load_tokenizer  # noqa: E402

CPU_QUICK_MODELS = ["tiny-qwen2", "tiny-bloom"]
CPU_MODELS = CPU_QUICK_MODELS + ["qwen2-small-151k"]
GPU_MODELS = ["qwen2-0.5b", "qwen2-1.5b", "bloom-560m", "bloom-1b7", "qwen1.5-0.5b", "bloom-389m-zh", "bloom-1b4-zh"]
GPU_QUICK_MODELS = ["qwen2-0.5b", "bloom-560m"]

# A CPU-sized Qwen2 (~30M parameters) with Qwen2-0.5B's 151,936-token vocabulary and tied output
# matrix; every other name is the registry's own config.
SMALL = {"qwen2-small-151k": ("qwen2-0.5b", dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2))}


@dataclass
class Settings:
    batch_tokens: int       # tokens per optimizer step (one packed micro-batch)
    warmup: int             # untimed steps per implementation
    steps: int              # timed steps (median)
    phase_steps: int        # steps of the forward/backward/optimizer split
    eval_prompts: int
    eval_new_tokens: int
    eval_reps: int

    @classmethod
    def for_device(cls, device: torch.device, quick: bool, dry_run: bool = False) -> "Settings":
        if dry_run:                            # one step of each kind: a smoke test
            return cls(256, 0, 1, 1, 2, 2, 1)
        if device.type == "cuda":
            return cls(16384, 2, 4 if quick else 5, 3, 256, 128, 2)
        return cls(512, 1, 3 if quick else 5, 2, 8 if quick else 16, 16 if quick else 32, 1 if quick else 2)


# ---------------------------------------------------------------- models and data

def hf_config_dict(name: str) -> dict:
    """The registry's config.json keys for `name` (or a SMALL variant)."""
    base, override = SMALL.get(name, (name, {}))
    return {**REGISTRY[base].config, **override}


def build_ours(raw: dict, device, dtype):
    return build_model(ModelConfig.from_dict(raw, "bench config"), device, dtype, seed=0).train()


def poem_examples(vocab_size: int, seed: int = 0) -> list[Example]:
    """The 2,000 frozen CN poems in the plain format, tiny-tokenizer ids; random ids of the same lengths
    when the model's vocabulary is not the tiny tokenizer's."""
    tokenizer = load_tokenizer("tiny-qwen2")
    examples = encode_examples(load_poems("cn", 256, 2000, seed), tokenizer, "cn", "plain")
    if vocab_size == tokenizer.vocab_size:
        return examples
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: tuple(torch.randint(1, vocab_size, (n,), generator=g).tolist())  # noqa: E731
    return [Example(rand(len(e.prompt_ids)), rand(len(e.target_ids))) for e in examples]


def padded(batch: PackedBatch, device):
    """The packed batch's sequences right-padded to the longest: (input_ids, attention_mask, labels) [B, L]."""
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()

    def pad(t, value):
        return pad_sequence(t.split(lengths), batch_first=True, padding_value=value).to(device)
    return pad(batch.input_ids, 0), pad(torch.ones_like(batch.input_ids), 0), pad(batch.labels, -100)


def shuffled_batches(examples: list[Example], batches: list[PackedBatch], seed: int = 0) -> list[PackedBatch]:
    """What a shuffling DataLoader feeds the usual stack: as many sequences per step as our batches
    hold, drawn in random order (so lengths mix and padding grows)."""
    per_step = round(statistics.mean(b.num_sequences for b in batches))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collate([examples[i] for i in order[k:k + per_step]]) for k in range(0, per_step * len(batches), per_step)]


def flops_per_token(model, batches: list[PackedBatch]) -> float:
    """engine.costs' training FLOPs over these batches' sequences per token: 6N + 12 L H ctx."""
    lengths = [L for b in batches for L in (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()]
    return train_flops(model.config, model.num_parameters(), lengths) / sum(lengths)


# ---------------------------------------------------------------- timing

def timed(fn, device) -> float:
    """Wall seconds of one fn() call, the device synchronized around it."""
    return common.Timer(device).seconds(fn)[1]


def host_syncs(fn, device) -> list[str] | None:
    """The synchronizing CUDA calls fn() makes (torch's sync debug mode); None on the CPU."""
    if device.type != "cuda":
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:200] for w in caught]


def matmul_tflops(device, dry_run: bool = False) -> float:
    """Median dense matmul throughput: bf16 8192^3 on the GPU, fp32 1024^3 on the CPU (256^3: dry run)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (256 if dry_run else 1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = common.Timer(device, 3, 10 if device.type == "cuda" else 5).median_ms(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


# ---------------------------------------------------------------- training

def train_ours(raw, batches, s: Settings, device, dtype) -> tuple[dict, object]:
    with common.PeakMemory(device) as mem:
        model = build_ours(raw, device, dtype)
        opt = AdamW(parameter_groups(model, 0.01), lr=1e-5, weight_decay=0.01)
        step = lambda b: train_step(model, opt, [b], b.num_target_tokens, device, 1.0)  # noqa: E731
        steps = batches[:s.warmup + s.steps]
        result = common.time_steps(step, steps, [b.num_tokens for b in steps], s.warmup, device)
        result["host_syncs"] = host_syncs(lambda: step(batches[0]), device)
    phases = {"forward": [], "backward": [], "optimizer": []}
    for b in batches[:s.phase_steps]:
        labels = b.shifted_labels().to(device)
        d = b.to(device)
        holder = {}
        phases["forward"].append(timed(lambda: holder.update(loss=model.loss(
            d.input_ids, labels, d.cu_seqlens, d.position_ids, d.max_seqlen, reduction="sum") / b.num_target_tokens),
            device))
        phases["backward"].append(timed(lambda: holder["loss"].backward(), device))
        phases["optimizer"].append(timed(lambda: (opt.clip_grad_norm_(1.0), opt.step(), opt.zero_grad()), device))
    opt = None                 # the optimizer state freed before the evaluation
    result.update(step_seconds={k: statistics.median(v) for k, v in phases.items()}, peak_memory_bytes=mem.bytes)
    return result, model


def train_theirs(side: TransformersSide, raw, batches, s: Settings, device, dtype, liger: bool = False) -> dict:
    """transformers' training steps on the same examples per step, right-padded (bench/transformers_side.py's
    train, in its own process); the model stays there for eval_theirs."""
    steps = batches[:s.warmup + s.steps]
    return side.train(raw, [padded(b, "cpu") for b in steps], [b.num_tokens for b in steps], s.warmup, device, dtype,
                      liger)


# ---------------------------------------------------------------- evaluation

def eval_ours(model, prompts: list[list[int]], s: Settings, device) -> dict:
    greedy_generate(model, prompts[:8], 4, eos_token_ids=[])          # compile kernels, fill lazy caches
    runs = []
    for _ in range(s.eval_reps):
        stats = {}
        seconds = timed(lambda: stats.update(out=greedy_generate(model, prompts, s.eval_new_tokens, eos_token_ids=[],
                                                                 stats=stats)), device)
        runs.append((seconds, stats))
    seconds, stats = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"tokens_per_second": stats["generated_tokens"] / seconds, "seconds": [r[0] for r in runs],
            "gb_per_second": bench_generate.bytes_read(model, prompts, stats["out"], stats["steps"]) / seconds / 1e9}


def eval_theirs(side: TransformersSide, prompts: list[list[int]], s: Settings) -> dict:
    """transformers' generate on the left-padded prompts, one batch, with the model train_theirs left."""
    seconds = side.generate_timed(prompts, s.eval_new_tokens, len(prompts), reps=s.eval_reps)["seconds"]
    return {"tokens_per_second": len(prompts) * s.eval_new_tokens / statistics.median(seconds), "seconds": seconds}


# ---------------------------------------------------------------- one model, the run

def workload(name: str, s: Settings) -> tuple[dict, list[Example], list[PackedBatch]]:
    """The model's config.json keys, its poems and enough packed batches (repeated) for every timed pass."""
    raw = hf_config_dict(name)
    examples = poem_examples(raw["vocab_size"])
    batches = pack(examples, s.batch_tokens, seed=0, epoch=0)
    need = s.warmup + max(s.steps, s.phase_steps)
    return raw, examples, (batches * (-(-need // len(batches))))[:need]


def modeled_stages(raw: dict, batches: list[PackedBatch], device) -> dict | None:
    """engine.roofline's speed of light of these batches' step split as train_ours times it ({forward,
    backward, optimizer} seconds) on this card's ceilings; None off a known GPU."""
    hw = common.hardware(device)
    if hw is None:
        return None
    tokens = statistics.mean(b.num_tokens for b in batches)
    seq_len = tokens / statistics.mean(b.num_sequences for b in batches)
    share = sum(len(b.target_rows) for b in batches) / sum(b.num_tokens for b in batches)
    return stage_seconds(ModelConfig.from_dict(raw, "bench config"), round(tokens), seq_len, hw, share)


def bench_model(name: str, s: Settings, device, dtype, peak, matmul, save) -> tuple[dict, dict]:
    """(entry, detail) of one model; save(entry, detail) after each part is measured (ours' training,
    ours' evaluation, theirs, theirs shuffled), so a run cut short leaves the parts it finished."""
    raw, examples, batches = workload(name, s)
    prompts = [list(e.prompt_ids) for e in examples[:s.eval_prompts]]
    entry, detail = {}, {"settings": s.__dict__}
    # each model is dropped before the next is built: PeakMemory frees memory on entry
    ours, model = train_ours(raw, batches, s, device, dtype)
    params, fpt = model.num_parameters(), flops_per_token(model, batches)
    achieved = ours["tokens_per_second"] * fpt / 1e12
    entry.update(params=params, train_tokens_per_second=ours["tokens_per_second"], mfu=achieved / peak if peak else None,
                 step_seconds=ours["step_seconds"], modeled_step_seconds=modeled_stages(raw, batches[:s.phase_steps],
                                                                                        device),
                 peak_memory_bytes=ours["peak_memory_bytes"])
    detail.update(flops_per_token=fpt, achieved_tflops=achieved, mfu_vs_matmul=achieved / matmul if matmul else None,
                  train=ours)
    save(entry, detail)
    ours_eval = eval_ours(model, prompts, s, device)
    entry.update(eval_tokens_per_second=ours_eval["tokens_per_second"], eval_gb_per_second=ours_eval["gb_per_second"])
    detail["eval"] = ours_eval
    save(entry, detail)
    del model
    common.free(device)
    with TransformersSide(threads=torch.get_num_threads() if device.type == "cpu" else None) as side:
        theirs = train_theirs(side, raw, batches, s, device, dtype)
        theirs_eval = eval_theirs(side, prompts, s)
        entry.update(baseline={"train_tokens_per_second": theirs["tokens_per_second"],
                               "eval_tokens_per_second": theirs_eval["tokens_per_second"],
                               "peak_memory_bytes": theirs["peak_memory_bytes"]},
                     ratio={"train": ours["tokens_per_second"] / theirs["tokens_per_second"],
                            "eval": ours_eval["tokens_per_second"] / theirs_eval["tokens_per_second"]})
        detail.update(baseline_mfu=theirs["tokens_per_second"] * fpt / 1e12 / peak if peak else None,
                      baseline_train=theirs, baseline_eval=theirs_eval)
        save(entry, detail)
        detail["baseline_shuffled_train"] = train_theirs(side, raw, shuffled_batches(examples, batches), s, device,
                                                         dtype)
    # what packing an epoch of the 2,000 poems costs the host (median ms)
    detail["pack_epoch_ms"] = common.Timer(torch.device("cpu"), 1, 5).median_ms(
        lambda: pack(examples, s.batch_tokens, seed=0, epoch=1))
    return entry, detail


def run(models: list[str] | None, quick: bool, out_dir, device=None, time_budget: float | None = None,
        dry_run: bool = False) -> dict:
    """Benchmark `models` (None: the CPU trio, or the paper's models on a GPU), each Qwen2 with Liger right
    after its own run, write throughput-<device>.json/.md under out_dir and return the JSON's content and
    the details (their "errors": each failed model's one line). Runs left when
    `time_budget` seconds have passed are skipped (the files are rewritten after every run).
    `dry_run`: one step of each kind, and any error raises (a smoke test of this script)."""
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    defaults = {("cpu", True): CPU_QUICK_MODELS, ("cpu", False): CPU_MODELS, ("cuda", True): GPU_QUICK_MODELS,
                ("cuda", False): GPU_MODELS}
    models = models or (CPU_QUICK_MODELS if dry_run else defaults[device.type, quick])
    s = Settings.for_device(device, quick, dry_run)
    if device.type == "cpu":
        torch.set_num_threads(1)               # both sides on one thread: stabler timings on a shared machine
    hw = common.hardware(device)
    result = {"device": common.device_name(device), "peak_tflops": hw.peak_bf16_flops / 1e12 if hw else None,
              "matmul_tflops": matmul_tflops(device, dry_run), "models": {}, "partial": {}}
    details = {**common.meta(device), "dtype": str(dtype), "skipped": [], "errors": {}, "liger": {}, "models": {}}
    out = Path(out_dir)
    # looked up, not imported: Liger imports transformers, which runs only in the transformers side's processes
    has_liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    for model, liger in [(m, liger) for m in models for liger in (False, True)
                         if not liger or has_liger and hf_config_dict(m)["model_type"] == "qwen2"]:
        name = f"{model}+liger" if liger else model
        if liger and model not in result["models"]:
            continue
        if time_budget and time.perf_counter() - start > time_budget:
            details["skipped"].append(name)
            continue
        try:
            if liger:                            # a process of its own: Liger patches transformers' classes
                raw, _, batches = workload(model, s)
                with TransformersSide() as side:
                    details["liger"][model] = train_theirs(side, raw, batches, s, device, dtype, liger=True)
            else:
                t0 = time.perf_counter()

                def save(entry, detail, model=model):      # a partial row, written the moment a part is measured
                    result["partial"][model], details["models"][model] = entry, detail
                    write(out, result, details)
                    print(common.table(COLUMNS, [row(f"{model} (partial)", entry, detail)])[-1], flush=True)

                entry, details["models"][model] = bench_model(model, s, device, dtype, result["peak_tflops"],
                                                              result["matmul_tflops"], save)
                result["partial"].pop(model)
                result["models"][model] = entry
                details["models"][model]["bench_seconds"] = time.perf_counter() - t0
                print(common.table(COLUMNS, [row(model, result["models"][model], details["models"][model])])[-1],
                      flush=True)
        except Exception as e:                    # one model's failure (OOM, a missing shape) keeps the others
            if dry_run:
                raise
            details["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"error: {name}: {details['errors'][name]}", file=sys.stderr, flush=True)
        write(out, result, details)
    write(out, result, details)
    print(markdown(result, details))
    print(f"wrote {out / common.stem('throughput', details['device'])}.json/.md")
    return result, details


# ---------------------------------------------------------------- output

def write(out: Path, result: dict, details: dict) -> None:
    name = common.stem("throughput", details["device"])
    common.write_results(out, name, result, markdown(result, details))
    common.write_json(out / f"{name}-detail.json", details)


COLUMNS = ["model", "params", "train tok/s ours", "theirs", "ratio", "MFU (peak)", "MFU (matmul)", "fwd / bwd / opt ms",
           "peak mem", "eval tok/s ours", "theirs", "ratio", "eval GB/s"]


def row(name: str, m: dict, d: dict) -> list[str]:
    """One model's cells of the main table (COLUMNS); "-" for the parts a partial entry lacks."""
    b, ratio = m.get("baseline", {}), m.get("ratio", {})
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
    num = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
    gib = lambda x: f"{x / 2**30:.2f}" if x is not None else "-"  # noqa: E731
    st = m.get("step_seconds")
    split = " / ".join(f"{st[k] * 1e3:.0f}" for k in ("forward", "backward", "optimizer")) if st else "-"
    return [name, num(m.get("params") and m["params"] / 1e6, ".1f") + "M", num(m.get("train_tokens_per_second"), ",.0f"),
            num(b.get("train_tokens_per_second"), ",.0f"), f"**{num(ratio.get('train'), '.2f')}x**", pct(m.get("mfu")),
            pct(d.get("mfu_vs_matmul")), split, f"{gib(m.get('peak_memory_bytes'))} / {gib(b.get('peak_memory_bytes'))}",
            num(m.get("eval_tokens_per_second"), ",.0f"), num(b.get("eval_tokens_per_second"), ",.0f"),
            f"**{num(ratio.get('eval'), '.2f')}x**", num(m.get("eval_gb_per_second"), ".1f")]


def modeled_rows(models: dict) -> list[list[str]]:
    """Per model with a modeled split: measured / modeled ms of forward, backward, optimizer and the step."""
    rows = []
    for name, m in models.items():
        measured, modeled = m.get("step_seconds"), m.get("modeled_step_seconds")
        if measured and modeled:
            stages = ("forward", "backward", "optimizer")
            pairs = [(measured[k], modeled[k]) for k in stages] + [(sum(measured.values()), sum(modeled.values()))]
            rows.append([name] + [f"{a * 1e3:.1f} / {b * 1e3:.1f} ({a / b:.2f}x)" for a, b in pairs])
    return rows


def baseline_cells(r: dict) -> list[str]:
    """tok/s and padding share (and micro-batches when split) of one transformers training run."""
    micro = f" ({r['micro_batches']} micro-batches)" if r["micro_batches"] > 1 else ""
    return [f"{r['tokens_per_second']:,.0f}", f"{100 * (1 - r['real_tokens'] / r['padded_tokens']):.0f}%{micro}"]


def markdown(result: dict, details: dict) -> str:
    partial = result.get("partial", {})
    main = [row(n, m, details["models"][n]) for n, m in result["models"].items()] + \
        [row(f"{n} (partial)", m, details["models"][n]) for n, m in partial.items()]
    shuffled = [[n, *baseline_cells(d["baseline_train"]), *baseline_cells(d["baseline_shuffled_train"]),
                 f"{d['train']['tokens_per_second'] / d['baseline_shuffled_train']['tokens_per_second']:.2f}x"]
                for n, d in details["models"].items() if "baseline_shuffled_train" in d]
    modeled = modeled_rows({**result["models"], **partial})
    lines = [f"# Throughput on {result['device']} (torch {details['torch']}, {details['dtype']})", "",
             f"Matmul ceiling measured: {result['matmul_tflops']:.3g} TFLOP/s; datasheet bf16 peak: "
             f"{result['peak_tflops'] or '-'}. Training: real tokens/s (median step), ours packed vs transformers "
             "padded. Step split (ms): forward / backward / optimizer. Memory GiB: ours / theirs. A partial row "
             "is a model whose run was cut short: the parts it finished.", "",
             *common.table(COLUMNS, main, "l" + "r" * 12), ""]
    if modeled:
        lines += ["Measured / modeled ms per part of our step (engine/roofline.py, the speed of light on this card's "
                  "ceilings at the measured batches' tokens and sequence length; measured / modeled in brackets):",
                  "", *common.table(["model", "forward", "backward", "optimizer", "step"], modeled, "lrrrr"), ""]
    lines += ["Theirs on our batches (same examples per step: our packer groups similar lengths, so little "
              "padding) and on shuffled batches (what a shuffling DataLoader gives: same sequences per step, "
              "lengths mixed):", "",
              *common.table(["model", "theirs, our batches: tok/s", "padding", "theirs, shuffled: tok/s", "padding",
                             "ours / shuffled"], shuffled, "lrrrrr")]
    for n, r in details["liger"].items():
        ratio = result["models"][n]["train_tokens_per_second"] / r["tokens_per_second"]
        lines.append(f"\n{n} + Liger: {r['tokens_per_second']:,.0f} tok/s, "
                     f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB (ours / liger = {ratio:.2f}x)")
    for n, d in details["models"].items():
        if d.get("train", {}).get("host_syncs"):
            lines.append(f"\n{n}: {len(d['train']['host_syncs'])} host syncs in one training step: "
                         f"{'; '.join(sorted(set(d['train']['host_syncs'])))}")
    for n, e in details["errors"].items():
        lines.append(f"\n{n} failed: {e}")
    if details["skipped"]:
        lines.append(f"\nSkipped (time budget): {', '.join(details['skipped'])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = common.parser(__doc__, quick="fewer steps (and two models on a GPU)")
    p.add_argument("--models", nargs="+", help=f"registry names or {', '.join(CPU_MODELS)} (default: by device)")
    p.add_argument("--time-budget", type=float, help="seconds; later models are skipped once it is spent")
    args = p.parse_args(argv)
    unknown = [m for m in args.models or [] if m not in REGISTRY and m not in SMALL]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}: choose registry names or {', '.join(SMALL)}")
    device = common.pick_device(args, p)
    errors = run(args.models, args.quick, args.out, device, args.time_budget, args.dry_run)[1]["errors"]
    return 2 if errors else 0               # each failure's error line is printed as it happens


if __name__ == "__main__":
    sys.exit(main())
