"""Hugging Face's Trainer with a memkernels optimizer, a checkpoint, and a resume from it.

    pip install transformers accelerate
    python examples/hf_trainer.py --output-dir /tmp/hf_run
    python examples/hf_trainer.py --output-dir /tmp/hf_run --steps 20 --width 32    # a quick run

A small GPT-2 built from a config (no download) learns bytes of the Python standard library's sources
(memkernels.bench.lm). The run saves a checkpoint halfway; a second Trainer with a fresh model and a fresh
optimizer resumes from it and must end with the same weights, since Trainer saves and reloads the optimizer's
state_dict (its moments, step counts and memkernels' own state). The last line reads `loss <before> -> <after>`
(held-out loss).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import memkernels as mk
from memkernels.bench.lm import stdlib_text


def windows(data: torch.Tensor, context: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive byte windows as examples; GPT-2 shifts the labels itself."""
    return [{"input_ids": w, "labels": w} for w in data[:count * context].view(count, context)]


def build(args: argparse.Namespace) -> tuple[GPT2LMHeadModel, mk.AdamW]:
    torch.manual_seed(args.seed)
    # No dropout: the interrupted and the uninterrupted run then do the same arithmetic.
    config = GPT2Config(vocab_size=256, n_positions=args.context, n_embd=args.width, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    # Trainer calls optimizer.step() without a closure, so memory is measured from the change of the gradient
    # between steps (hvp="trajectory"). A memory_correction would want the probe, which needs step(closure):
    # see examples/mnist_mlp.py for that loop. track_memory=10 measures one step in 10, the cadence a log reads it
    # at, for a tenth of the cost of measuring every step.
    opt = mk.AdamW(model.parameters(), lr=args.lr, track_memory=10, hvp="trajectory")
    return model, opt


def trainer(model, opt, data, output_dir: Path, args: argparse.Namespace) -> Trainer:
    targs = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.batch,
        save_strategy="steps", save_steps=args.steps // 2, logging_steps=max(1, args.steps // 5),
        seed=args.seed, use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True)
    # (opt, None): Trainer uses this optimizer, and builds its default (linear decay) schedule around it.
    return Trainer(model=model, args=targs, train_dataset=data[0], eval_dataset=data[1], optimizers=(opt, None))


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200, help="an even number: the checkpoint is halfway")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # one epoch of training windows, and a megabyte more so that the held-out files (every tenth) fill the eval set
    train_bytes, held_out_bytes = stdlib_text(args.steps * args.batch * args.context + 10**6)
    data = (windows(train_bytes, args.context, args.steps * args.batch),
            windows(held_out_bytes, args.context, min(256, len(held_out_bytes) // args.context)))

    model, opt = build(args)
    run = trainer(model, opt, data, args.output_dir / "run", args)
    first = run.evaluate()["eval_loss"]
    run.train()
    last = run.evaluate()["eval_loss"]
    print("memory_stats:", {k: round(v, 6) for k, v in opt.memory_stats()[0].items()})

    # Resume: a fresh model and optimizer take the weights, the optimizer state, the schedule and the data order
    # from the halfway checkpoint, then train to the end.
    resumed_model, resumed_opt = build(args)
    resumed = trainer(resumed_model, resumed_opt, data, args.output_dir / "resumed", args)
    resumed.train(resume_from_checkpoint=str(args.output_dir / "run" / f"checkpoint-{args.steps // 2}"))
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    print(f"resumed from step {args.steps // 2}: final weights equal the uninterrupted run's: {same}")
    print(f"loss {first:.6f} -> {last:.6f}")
    return first, last


if __name__ == "__main__":
    main()
