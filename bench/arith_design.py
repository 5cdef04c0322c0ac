"""How the built-in arithmetic task and its fine-tuning budget were chosen (docs/benchmark.md, "Design").

One process, no Ray: build (or reuse) a base model for a variant of the task's levels and pretraining
length, evaluate it, fine-tune LoRA / Flexi-LoRA with an oracle router (rank from the base model's
own correctness) for each rank spec, and print accuracy per group and level. It is the measurement
behind the task's design, kept so the figures can be redone; the pipeline itself never imports it.

    T=2 .venv/bin/python bench/arith_design.py --levels '{"2": [[10,19],1]}' --pre_steps 600 \
        --ft_mix 0.1,0.2,0.35,0.35 --ft_steps 160 --bs 64 --lr 0.005 --ranks "8;2,8;2" \
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexi_workflows.adapters.config import FlexiLoraConfig
from flexi_workflows.adapters.model import inject_flexi_lora
from flexi_workflows.data.causal_lm import collate, encode_example
from flexi_workflows.metrics import parse_number
from flexi_workflows.models.pretrain import PretrainSpec, pretrain_arith_model
from flexi_workflows.tasks import arith

p = argparse.ArgumentParser()
p.add_argument("--levels", default="")  # json {"2": [[10,19],1]}
p.add_argument("--pre_mix", default="0.5,0.4,0.1,0.0")
p.add_argument("--pre_steps", type=int, default=380)
p.add_argument("--ft_mix", default="0.2,0.2,0.3,0.3")
p.add_argument("--ft_steps", type=int, default=200)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--lr", type=float, default=5e-3)
p.add_argument("--ranks", default="8")  # "8" or "2,8" (flexi oracle by base-correctness)
p.add_argument("--alpha", type=float, default=16)
p.add_argument("--seeds", default="0")
p.add_argument("--tag", default="x")
p.add_argument("--ntest", type=int, default=400)
p.add_argument("--targets", default="")
p.add_argument("--split", default="dev", help="dev (design decisions) or test (the evaluation items: never choose on it)")
a = p.parse_args()
torch.set_num_threads(int(__import__("os").environ.get("T","1")))
if a.levels:
    for k, v in json.loads(a.levels).items():
        arith.LEVELS[int(k)] = (tuple(v[0]), v[1])
pre_mix = tuple(float(x) for x in a.pre_mix.split(","))
ft_mix = tuple(float(x) for x in a.ft_mix.split(","))
arith.SPLITS["pretrain"] = (pre_mix, 11, 20000)
arith.SPLITS["train"] = (ft_mix, 22, 2000)
key = f"{a.levels}|{a.pre_mix}|{a.pre_steps}"
import hashlib

folder = Path(__import__("tempfile").gettempdir()) / ("arith-design-base-" + hashlib.sha1(key.encode()).hexdigest()[:8])
if not (folder / "model.safetensors").exists():
    t = time.time(); pretrain_arith_model(folder, PretrainSpec(steps=a.pre_steps, threads=int(__import__("os").environ.get("T","1")))); print("pretrain s", time.time()-t)
tok = AutoTokenizer.from_pretrained(folder); tok.padding_side = "left"
test = arith.generate(a.split, a.ntest, arith.excluded_questions(a.split))
excl = {r["question"] for r in arith.generate("test")}

def prompt(r): return f"Question: {r['question']}\nAnswer:"

@torch.no_grad()
def evaluate(model, rows, ranks=None):
    model.eval(); correct = []
    for i in range(0, len(rows), 200):
        chunk = rows[i:i+200]
        enc = tok([prompt(r) for r in chunk], return_tensors="pt", padding=True)
        kw = {} if ranks is None else {"ranks": torch.tensor(ranks[i:i+200])}
        out = model.generate(**enc, max_new_tokens=36, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, t in zip(chunk, texts):
            parts = t.split("####")[-1].strip().split() if "####" in t else []
            ans = parts[0] if parts else ""
            v = parse_number(ans) if ans else None
            correct.append(v is not None and abs(v - float(r["answers"][0])) < 1e-6)
    return np.array(correct)

def summary(c, rows):
    easy = np.array([r["group"] == "easy" for r in rows]); lv = np.array([r["level"] for r in rows])
    return dict(all=round(c.mean()*100,1), easy=round(c[easy].mean()*100,1), hard=round(c[~easy].mean()*100,1),
                **{f"L{l}": round(c[lv==l].mean()*100,1) for l in (1,2,3,4)})

base = AutoModelForCausalLM.from_pretrained(folder)
bc = evaluate(base, test); print("BASE", summary(bc, test), flush=True)
train = arith.generate("train", 2000, excl)
tc = None
for rank_spec in a.ranks.split(';'):
    ranks = [int(x) for x in rank_spec.split(",")]
    if len(ranks) > 1:
        tc = evaluate(base, train) if tc is None else tc
        train_r = [ranks[0] if c else ranks[1] for c in tc]
        test_r = [ranks[0] if c else ranks[1] for c in bc]
        print("train easy-class share", tc.mean())
    else:
        train_r = [ranks[0]]*len(train); test_r = [ranks[0]]*len(test)
    ex = [dict(encode_example(prompt(r), r["target"], tok, max_prompt_tokens=96, max_target_tokens=48), rank=rk) for r, rk in zip(train, train_r)]
    res = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        torch.manual_seed(seed)
        fm = inject_flexi_lora(model, FlexiLoraConfig(r_max=max(ranks), alpha=a.alpha, targets=a.targets.split(',') if a.targets else None))
        params = [p for p in fm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s+1)/max(1, a.ft_steps*0.05)) * 0.5*(1+math.cos(math.pi*min(1.0, s/a.ft_steps))))
        g = torch.Generator().manual_seed(seed); fm.train(); t = time.time()
        for step in range(a.ft_steps):
            idx = torch.randint(0, len(ex), (a.bs,), generator=g).tolist()
            b = collate([ex[i] for i in idx], tok.pad_token_id)
            loss = fm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], ranks=b["ranks"]).loss
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
        tt = time.time()-t
        c = evaluate(fm, test, test_r)
        s = summary(c, test); s["train_s"] = round(tt,1); s["mean_rank"] = float(np.mean(test_r)); print(a.tag, rank_spec, "seed", seed, s, flush=True)
        res.append(s)
    print("RESULT", a.tag, rank_spec, json.dumps({k: round(float(np.mean([r[k] for r in res])),1) for k in res[0]}), "base", summary(bc, test))
