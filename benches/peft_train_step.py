"""PyTorch + PEFT reference benchmark: LoRA training step and inference forward on CPU.

Measures, for a randomly initialised LlamaForCausalLM with SmolLM2-135M's shape
(float32, 30 layers, hidden 576, GQA 9/3 heads, tied embeddings) wrapped with PEFT
LoRA (r=8, alpha=16, dropout 0, all seven linear projections, bias none):

  * train step: forward with labels (mean next-token cross-entropy) + backward +
    torch.optim.AdamW(lr=1e-4) step + zero_grad, over the LoRA params only;
  * inference: model.eval() + torch.no_grad() forward on the same batch
    (logits for all positions, no labels).

Batch is [4, 128] random token ids (seed 0), labels = input ids. Each phase runs
--warmup untimed iterations, then --steps timed ones (time.perf_counter).
Thread count: THREADS env var, default os.cpu_count().

Run:  python benches/peft_train_step.py [--steps N] [--warmup N] [--attn sdpa|eager]
Prints one JSON object on stdout; human-readable progress goes to stderr.
"""
import argparse
import json
import os
import statistics
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, SEQ, VOCAB = 4, 128, 49152


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = ap.parse_args()

    threads = int(os.environ.get("THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=2048,
        torch_dtype=torch.float32, attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                        "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    log(f"threads={threads} attn={model.config._attn_implementation} "
        f"trainable_params={n_trainable}")

    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    model.train()
    train = timed(train_step, args.warmup, args.steps)
    log(f"train step: median {statistics.median(train):.4f}s mean {statistics.mean(train):.4f}s")

    model.eval()

    def infer():
        with torch.no_grad():
            return model(input_ids=ids).logits

    inf = timed(infer, 2, 10)
    log(f"infer forward: median {statistics.median(inf):.4f}s")

    med, imed = statistics.median(train), statistics.median(inf)
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "threads": threads,
        "train_step_median_s": med, "train_step_mean_s": statistics.mean(train),
        "train_tokens_per_s": BATCH * SEQ / med,
        "infer_forward_median_s": imed, "infer_tokens_per_s": BATCH * SEQ / imed,
        "trainable_params": n_trainable, "batch": BATCH, "seq": SEQ,
    }))


if __name__ == "__main__":
    main()
