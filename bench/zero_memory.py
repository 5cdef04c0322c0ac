"""Where a DeepSpeed worker's GPU memory goes, stage by stage: one process per ZeRO stage, no Ray.

bench/gpu_check.sh reports each run's peak against `flexi plan`; this says which phase holds the
memory, so a gap between the two can be traced: after loading the model, after deepspeed.initialize,
then for each step the peak and what stays allocated across the forward and the backward. The
model is the GPU check's (LLaMA-3.2-1B width with random bf16 weights, Flexi-LoRA r_max 8 on q/k/v/o,
ranks 2 and 8 per row), loaded through the worker's own path (load_model, under partitioned_build for
ZeRO-3) and driven by the worker's DeepSpeedEngine.

    python bench/zero_memory.py --stage 3 --out z3.json        # on a GPU
    python bench/zero_memory.py --cpu --stage 3 --out z3.json  # tiny, on CPU: checks that it runs

One process is one worker. RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment
make several: two processes with WORLD_SIZE=2 (and RANK 0 and 1) run a 2-worker ZeRO-3 on CPU (gloo).

The last line printed (and --out) is one JSON object; sizes are GiB. Beside the allocator's figures (GPU
only) each forward records, on CPU too, `saved_activations_mib` (what autograd kept for the backward,
parameters' storages left out) and, under ZeRO-3, `gathered` (parameters materialised at that point and
whether they hold storage beside their partition), `saved_weight_views_mib` (views of weights kept
for the backward, which would pin gathered copies with several workers); `linear` names the F.linear
the process ran. These found ZeRO-3's extra 1.27 GiB on the H200: DeepSpeed's ZeRO-3 linear saving the
input of every frozen linear (training/engines.frozen_aware_zero3_linear).
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

    def linear_kind() -> str:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        from flexi_workflows.training.engines import _zero3_linear

        f = torch.nn.functional.linear
        return {torch._C._nn.linear: "torch", zero3_linear_wrap: "deepspeed",
                _zero3_linear: "frozen-aware"}.get(f, repr(f))

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

    def gathered(module) -> dict:
        """ZeRO-3 parameters whose full tensor is materialised (status AVAILABLE) at this point, and
        whether that tensor is a storage of its own beside the partition (a second copy) or the partition."""
        out = {"params": 0, "gib": 0.0, "own_storage_gib": 0.0}
        for p in module.parameters():
            if not hasattr(p, "ds_tensor") or getattr(p.ds_status, "name", "") != "AVAILABLE":
                continue
            size = p.data.numel() * p.data.element_size()
            out["params"] += 1
            out["gib"] += size / gib
            if p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr():
                out["own_storage_gib"] += size / gib
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

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
                              bf16=True, num_workers=int(os.environ["WORLD_SIZE"]))
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
        saved: dict[int, int] = {}
        # activations only: a saved weight (or its transposed view, or ZeRO's flat buffer of partitions)
        # is a parameter's storage, the same under either stage; each storage counted once
        weights = {p.data.untyped_storage().data_ptr() for p in model.parameters()}
        weights |= {p.ds_tensor.untyped_storage().data_ptr() for p in model.parameters() if hasattr(p, "ds_tensor")}

        views: dict[int, int] = {}

        def pack(t, saved=saved, views=views, weights=weights):
            storage = t.untyped_storage()
            if isinstance(t, torch.nn.Parameter):
                pass  # the parameter itself (ZeRO-3 may gather it during this forward: a storage not in weights)
            elif storage.data_ptr() in weights or isinstance(t._base, torch.nn.Parameter):
                # a view of a weight's data (torch's linear saves weight.t()): under ZeRO-3 over several
                # workers it would keep that weight's gathered copy alive until the backward
                views[storage.data_ptr()] = storage.nbytes()
            else:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = engine.model(input_ids=ids, labels=labels, ranks=ranks).loss
        record(f"step {step} forward")
        phases[f"step {step} forward"]["saved_activations_mib"] = round(sum(saved.values()) / 2**20, 3)
        phases[f"step {step} forward"]["saved_weight_views_mib"] = round(sum(views.values()) / 2**20, 3)
        if args.stage == 3:
            phases[f"step {step} forward"]["gathered"] = gathered(model)
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
    result = {"stage": args.stage, "device": str(device),
              # which F.linear the process ran (ZeRO-3: engines.frozen_aware_zero3_linear)
              "linear": linear_kind(), "layers": args.layers, "batch": args.batch, "seq": args.seq,
              "tied_embeddings": tied, "reduce_bucket_elements": getattr(engine.optimizer, "reduce_bucket_size", None),
              "param_bytes_gib": {k: round(v / gib, 3) for k, v in held.items()},
              "phases": phases}
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
