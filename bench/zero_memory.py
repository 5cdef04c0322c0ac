"""Where a DeepSpeed worker's GPU memory goes, stage by stage: one process per ZeRO stage, no Ray.

bench/gpu_check.sh reports each run's peak against `flexi plan`; this says which phase holds the
memory, so a gap between the two can be traced: after loading the model, after deepspeed.initialize,
then for each step the peak and what stays allocated across the forward and the backward. The
model is the GPU check's (LLaMA-3.2-1B width with random bf16 weights, Flexi-LoRA r_max 8 on q/k/v/o,
ranks 2 and 8 per row), loaded through the worker's own path (load_model, under partitioned_build for
ZeRO-3) and driven by the worker's DeepSpeedEngine.

    python bench/zero_memory.py --stage 3 --out z3.json        # on a GPU
    python bench/zero_memory.py --cpu --stage 3 --out z3.json  # tiny, on CPU: checks that it runs

The last line printed (and --out) is one JSON object; sizes are GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="a model folder made by an earlier run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.cpu else 16)
    args.batch = args.batch or (2 if args.cpu else 8)
    args.seq = args.seq or (32 if args.cpu else 512)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed
    import torch
    from gpu_check import TARGETS, make_model

    from flexi_workflows.adapters import FlexiLoraConfig, inject_flexi_lora
    from flexi_workflows.methods.base import Trainable
    from flexi_workflows.models.loading import load_model
    from flexi_workflows.training.engines import (
        DeepSpeedEngine,
        deepspeed_config,
        one_op_build,
        partitioned_build,
    )

    cuda = not args.cpu
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    gib = 2**30
    phases: dict[str, dict] = {}

    def record(name: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            phases[name] = {"allocated": round(torch.cuda.memory_allocated() / gib, 3),
                            "peak": round(torch.cuda.max_memory_allocated() / gib, 3)}
            torch.cuda.reset_peak_memory_stats()
        else:
            phases[name] = {}

    folder = args.model
    if folder is None or not (folder / "config.json").is_file():
        folder = folder or Path(tempfile.mkdtemp(prefix="zero-memory-")) / "llama-random"
        make_model(folder, argparse.Namespace(cpu=args.cpu, layers=args.layers))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with one_op_build():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    config = deepspeed_config(micro_batch_size=args.batch, accumulation=1, max_grad_norm=1.0, zero_stage=args.stage,
                              bf16=True)
    record("start")
    with partitioned_build(config) if args.stage == 3 else nullcontext():
        base = load_model(folder, dtype=torch.float32)
    record("model loaded")
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = inject_flexi_lora(base, FlexiLoraConfig(r_max=8, targets=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = DeepSpeedEngine(Trainable(model, uses_row_ranks=True), optimizer, scheduler, config)
    record("engine ready")
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    half = args.seq // 2
    ranks = [8 if i % 4 == 0 else 2 for i in range(args.batch)]
    for step in range(args.steps):
        ids = torch.randint(4, vocab, (args.batch, args.seq), generator=generator).to(device)
        labels = ids.clone()
        labels[:, :half] = -100
        loss = engine.model(input_ids=ids, labels=labels, ranks=ranks).loss
        record(f"step {step} forward")
        engine.backward_step(loss, step)
        del loss
        record(f"step {step} backward+step")
    # bytes this worker holds: whole parameters (ZeRO-2, and the adapters), and ZeRO-3's partitions
    held = {"whole": 0, "partitions": 0}
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held["partitions"] += p.ds_tensor.numel() * p.ds_tensor.element_size()
        else:
            held["whole"] += p.numel() * p.element_size()
    result = {"stage": args.stage, "device": str(device), "layers": args.layers, "batch": args.batch, "seq": args.seq,
              "tied_embeddings": tied, "reduce_bucket_elements": getattr(engine.optimizer, "reduce_bucket_size", None),
              "param_bytes_gib": {k: round(v / gib, 3) for k, v in held.items()},
              "phases": phases}
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
