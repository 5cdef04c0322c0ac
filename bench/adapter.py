"""Flexi-LoRA vs PEFT LoRA: training-step and generation cost on a LLaMA-shaped model.

All variants share one set of random base weights and run in this one process, interleaved
round-robin so drift (thermal, other load) hits each equally, each round starting one variant further
along so none always runs first; each figure is a median of repeats.

    frozen base        backprop through the frozen model to its input embeddings (no adapter)
    peft lora r_max    PEFT LoRA at r_max on q, k, v, o
    flexi mixed        Flexi-LoRA r_max, a mixed-rank batch (paper-like: most at the low rank)
    flexi r_max        Flexi-LoRA r_max, every sample at r_max (uniform fast path)
    flexi low          Flexi-LoRA, every sample at the low rank (uniform fast path)
    flexi merged       generation only: the mixed batch in one generate call on the base weights with its most
                       common rank merged in and the other rows corrected, restored after (evaluation.merged),
                       through one RankMerger kept across calls as an evaluation actor keeps it
    merged cold        generation only: the same with a new RankMerger per call (its merge buffers allocated
                       afresh: generate_merged's default)
    merged uniform     generation only: the same batch with every row at the low rank, merged: no corrections,
                       so merging and restoring alone
    base again         generation only: the frozen base once more, later in the round: a null control, whose
                       ratio to the frozen base is this machine's noise on a ratio of two identical workloads
    base stream        generation only: the frozen base on --stream-batches batches of mixed-rank rows
    merged stream      generation only: the same rows sorted by rank (as the evaluation stage sorts them
                       with evaluation.merged), each batch generated merged

The last line printed is one JSON object; `train_step_ratio_vs_peft` and `generate_ratio_vs_peft`
are flexi-mixed time / PEFT time (lower is better); `merged_generate_ratio_vs_base` is flexi-merged time
(merging and restoring included) / the frozen base's time on the same batch, and
`merged_uniform_generate_ratio_vs_base` the same for a single-rank batch, which leaves out the other
ranks' corrections (merging and restoring alone), and `merged_cold_generate_ratio_vs_base` the same
for a new merger per call.
`merged_sorted_generate_ratio_vs_base` is merged stream / base stream: what the evaluation stage pays.
Those are ratios of medians. `paired_ratio_vs_base` holds, for the merged variants and the null control,
the median over rounds of each round's own ratio to that round's frozen base (which cancels drift slower
than a round), and `base_again_ratio_vs_base` the null control's ratio of medians: on a shared machine
read the merged figures against those two.

    python bench/adapter.py            # hidden 512, 4 layers, seq 256, batch 8
    python bench/adapter.py --quick    # same shapes, fewer repeats: about 70 s on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexi_workflows.adapters import FlexiLoraConfig, StaticRank, inject_flexi_lora  # noqa: E402
from flexi_workflows.adapters.merged import RankMerger
from flexi_workflows.adapters.merged import generate_merged as merged_generate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, args.prompt + args.new_tokens) + 8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype=args.dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_variants(base, args):
    from peft import LoraConfig, get_peft_model

    r_max, low = args.r_max, args.low_rank
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r_max, lora_alpha=2 * r_max, target_modules=TARGETS, lora_dropout=0.0)
    )
    flexi = inject_flexi_lora(
        copy.deepcopy(base), FlexiLoraConfig(r_max=r_max, alpha=2 * r_max, targets=TARGETS), StaticRank(r_max)
    )
    # identical nonzero adapter weights in both, so both do the same arithmetic
    g = torch.Generator().manual_seed(1)
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in flexi.flexi_layers():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.02)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
            peft_modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    n_high = max(1, round(args.batch * args.high_share))
    mixed = torch.tensor([r_max] * n_high + [low] * (args.batch - n_high))[torch.randperm(args.batch, generator=g)]
    return {
        "frozen base": (base, None),
        f"peft lora r{r_max}": (peft_model, None),
        "flexi mixed": (flexi, mixed),
        f"flexi r{r_max}": (flexi, r_max),
        f"flexi r{low}": (flexi, low),
    }, mixed


def train_step(model, ranks, ids, is_base):
    """One forward + backward with a next-token loss; gradients are dropped, not applied."""
    kwargs = {} if ranks is None else {"ranks": ranks}
    if is_base:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def generate(model, ranks, prompt, new_tokens):
    kwargs = {} if ranks is None else {"ranks": ranks}
    with torch.no_grad():
        return model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def generate_merged(flexi, ranks, prompt, new_tokens, merger=None):
    """The batch in one generate call on the base weights with a rank merged in (adapters/merged.py)."""
    inputs = {"input_ids": prompt}
    return torch.stack(merged_generate(flexi, ranks, inputs,
                                       lambda base, batch: list(generate(base, None, batch["input_ids"], new_tokens)),
                                       merger=merger))


def stream_ranks(mixed, batches, g):
    """The mixed batch's share of ranks in every batch of the stream, shuffled within each batch."""
    return torch.cat([mixed[torch.randperm(len(mixed), generator=g)] for _ in range(batches)])


def generate_stream_base(base, prompts, batch, new_tokens):
    for start in range(0, len(prompts), batch):
        generate(base, None, prompts[start:start + batch], new_tokens)


def generate_stream_merged(flexi, ranks, prompts, batch, new_tokens, merger=None):
    """The rows sorted by rank (stable), batched as the base batches them, each batch generated merged."""
    order = torch.sort(ranks, stable=True).indices
    out = [None] * len(prompts)
    for start in range(0, len(prompts), batch):
        rows = order[start:start + batch]
        outputs = generate_merged(flexi, ranks[rows], prompts[rows.to(prompts.device)], new_tokens, merger)
        for i, seq in zip(rows.tolist(), outputs):
            out[i] = seq
    return torch.stack(out)


def measure(variants, fn, repeats, warmup):
    """Each variant's median time, and every round's times (rounds interleave the variants).

    Each round starts one variant further along (round i runs them from the i-th on, wrapping), so no
    variant always runs first or last in a round: with a fixed order, the frozen base measured a second
    time later in each round (the null control) came out 1.029 ± 0.048 × its first measurement."""
    times = {name: [] for name in variants}
    names = list(variants)
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            model, ranks = variants[name]
            start = time.perf_counter()
            fn(name, model, ranks)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times


def paired_ratio(times, name, reference):
    """The median over rounds of name's time / reference's time in the same round."""
    return round(statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True)), 4)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 70 s on 2 idle cores)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--r-max", type=int, default=8)
    parser.add_argument("--low-rank", type=int, default=2)
    parser.add_argument("--high-share", type=float, default=0.25, help="share of the mixed batch at r_max")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--stream-batches", type=int, default=4,
                        help="batches in the merged-stream comparison (4 × 8 rows at a 0.25 share: whole batches)")
    parser.add_argument("--generate-only", action="store_true", help="skip the train-step timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_repeats = args.repeats or (3 if args.quick else 15)
    gen_repeats = args.repeats or (5 if args.quick else 15)

    base = build_base(args).to(args.device)
    variants, mixed = build_variants(base, args)
    variants = {k: (m.to(args.device), r) for k, (m, r) in variants.items()}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g).to(args.device)
    stream_prompts = torch.randint(3, args.vocab, (args.batch * args.stream_batches, args.prompt), generator=g)
    stream_prompts = stream_prompts.to(args.device)
    ranks_stream = stream_ranks(mixed, args.stream_batches, g)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def train_fn(name, model, ranks):
        for m, _ in variants.values():
            m.train() if m is not base else m.eval()
        train_step(model, ranks, ids, model is base)
        sync()

    def gen_fn(name, model, ranks):
        model.eval()
        if name in ("flexi merged", "merged uniform"):
            generate_merged(model, ranks, prompt, args.new_tokens, merger)
        elif name == "merged cold":
            generate_merged(model, ranks, prompt, args.new_tokens)
        elif name == "base stream":
            generate_stream_base(model, stream_prompts, args.batch, args.new_tokens)
        elif name == "merged stream":
            generate_stream_merged(model, ranks, stream_prompts, args.batch, args.new_tokens, merger)
        else:
            generate(model, ranks, prompt, args.new_tokens)
        sync()

    flexi = variants["flexi mixed"][0]
    merger = RankMerger(flexi)  # one for the run, as an evaluation actor keeps one
    started = time.perf_counter()
    flexi.eval()
    merged_out = generate_merged(flexi, mixed, prompt, args.new_tokens, merger)
    unmerged_out = generate(flexi, mixed, prompt, args.new_tokens)
    merged_tokens_equal = torch.equal(merged_out, unmerged_out)
    # in bf16 a greedy near-tie can flip (adapters/merged.py): how far apart, not only whether
    new_merged, new_unmerged = merged_out[:, -args.new_tokens:], unmerged_out[:, -args.new_tokens:]
    merged_agreement = {"rows_equal": round((new_merged == new_unmerged).all(dim=1).float().mean().item(), 4),
                        "first_token_equal": round((new_merged[:, 0] == new_unmerged[:, 0]).float().mean().item(), 4)}
    b = args.batch
    unmerged_stream = torch.cat([generate(flexi, ranks_stream[s:s + b], stream_prompts[s:s + b], args.new_tokens)
                                 for s in range(0, len(stream_prompts), b)])
    merged_stream = generate_stream_merged(flexi, ranks_stream, stream_prompts, b, args.new_tokens, merger)
    stream_tokens_equal = torch.equal(merged_stream, unmerged_stream)
    train = {} if args.generate_only else measure(variants, train_fn, train_repeats, warmup=1)[0]
    gen_variants = {**variants, "flexi merged": (flexi, mixed), "merged cold": (flexi, mixed),
                    "merged uniform": (flexi, args.low_rank), "base again": (base, None),
                    "base stream": (base, None), "merged stream": (flexi, ranks_stream)}
    gen, rounds = measure(gen_variants, gen_fn, gen_repeats, warmup=1 if args.quick else 2)
    paired = {name: paired_ratio(rounds, name, "frozen base")
              for name in ("flexi merged", "merged cold", "merged uniform", "base again")}
    paired["merged stream"] = paired_ratio(rounds, "merged stream", "base stream")
    peft_name = f"peft lora r{args.r_max}"

    print(
        f"LLaMA-shaped: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, "
        f"{args.device}, {torch.get_num_threads()} threads; LoRA r_max={args.r_max} on {','.join(TARGETS)}"
    )
    print(
        f"train step: batch {args.batch} × seq {args.seq}, fwd+bwd, median of {train_repeats}; "
        f"generate: batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens greedy, "
        f"median of {gen_repeats}"
    )
    print(f"mixed batch ranks: {mixed.tolist()}")
    print()
    print(f"{'variant':<16}{'train step s':>14}{'vs peft':>9}{'generate s':>13}{'vs peft':>9}{'tokens/s':>11}")
    for name in gen_variants:
        tok_s = args.batch * args.new_tokens / gen[name]
        step = f"{train[name]:>14.4f}{train[name] / train[peft_name]:>9.3f}" if name in train else f"{'—':>14}{'':>9}"
        print(f"{name:<16}{step}{gen[name]:>13.4f}{gen[name] / gen[peft_name]:>9.3f}{tok_s:>11.0f}")
    print(f"\nflexi merged / frozen base, generation: {gen['flexi merged'] / gen['frozen base']:.3f} "
          f"(goal ≤ 1.05); a new merger per call: {gen['merged cold'] / gen['frozen base']:.3f}; "
          f"a single-rank batch merged: {gen['merged uniform'] / gen['frozen base']:.3f}; "
          f"merged tokens equal the unmerged mixed batch's: {merged_tokens_equal} "
          f"(rows equal {merged_agreement['rows_equal']:.0%}, first new token {merged_agreement['first_token_equal']:.0%})")
    print(f"{args.stream_batches} batches sorted by rank, merged / the frozen base on the same rows: "
          f"{gen['merged stream'] / gen['base stream']:.3f}; "
          f"tokens equal the unmerged batches': {stream_tokens_equal}")
    print(f"null control, the frozen base again / the frozen base: {gen['base again'] / gen['frozen base']:.3f}; "
          f"paired per round (median of each round's ratio): " + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    result = {
        "train_step_ratio_vs_peft": round(train["flexi mixed"] / train[peft_name], 4) if train else None,
        "generate_ratio_vs_peft": round(gen["flexi mixed"] / gen[peft_name], 4),
        "train_step_ratio_rmax_vs_peft": (round(train[f"flexi r{args.r_max}"] / train[peft_name], 4)
                                          if train else None),
        "generate_ratio_rmax_vs_peft": round(gen[f"flexi r{args.r_max}"] / gen[peft_name], 4),
        "generate_ratio_peft_vs_base": round(gen[peft_name] / gen["frozen base"], 4),
        "generate_ratio_mixed_vs_base": round(gen["flexi mixed"] / gen["frozen base"], 4),
        "merged_uniform_generate_ratio_vs_base": round(gen["merged uniform"] / gen["frozen base"], 4),
        "merged_cold_generate_ratio_vs_base": round(gen["merged cold"] / gen["frozen base"], 4),
        "merged_tokens_equal_unmerged": merged_tokens_equal,
        "merged_agreement": merged_agreement,
        "merged_sorted_generate_ratio_vs_base": round(gen["merged stream"] / gen["base stream"], 4),
        "merged_sorted_tokens_equal_unmerged": stream_tokens_equal,
        "base_again_ratio_vs_base": round(gen["base again"] / gen["frozen base"], 4),
        "paired_ratio_vs_base": paired,
        "stream_batches": args.stream_batches,
        "train_step_s": {k: round(v, 5) for k, v in train.items()},
        "generate_s": {k: round(v, 5) for k, v in gen.items()},
        "mixed_ranks": mixed.tolist(),
        "device": args.device,
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "merged_generate_ratio_vs_base": round(gen["flexi merged"] / gen["frozen base"], 4),
    }
    print()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
