"""KDTrainer step against the same trainer computing full logits + F.kl_div: time and peak memory.

One optimizer step (student forward, teacher forward without gradient, KD loss, backward, AdamW
step) of a tiny random Llama student distilled from a Llama teacher of the same shape, on CPU:

- ``kdkernels``: :class:`kdkernels.integrations.transformers.KDTrainer` (fused lm_head + KD loss,
  the [tokens, vocab] logits never materialised);
- ``eager``: the same trainer with its loss computed as most KD code does: both models' full
  logits, ``F.kl_div(log_softmax(student / T), log_softmax(teacher / T), log_target=True)`` per
  token, masked and normalised the same way.

Each configuration runs in its own process (benchmarks.harness): median step time and the peak
RSS over the timed steps above the RSS once the models, optimizer and batch exist.

    python -m benchmarks.hf_trainer                     # V=32000, 4 layers, H=256, seq 512, batch 8
    python -m benchmarks.hf_trainer --vocab 1000 --seq 32 --batch 2 --repeat 2   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any, Callable, Dict

from benchmarks import harness

IMPLS = ("kdkernels", "eager")


def _logits_kd_trainer_class():
    """KDTrainer with the loss of plain PyTorch KD code: full logits of both models + F.kl_div."""
    import torch
    import torch.nn.functional as F

    from kdkernels.integrations.transformers import KDTrainer, next_token_labels

    class LogitsKDTrainer(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            targets = next_token_labels(inputs.pop("labels"))
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher.model(**inputs).logits
            temperature = self.kd_options.config.temperature
            per_token = F.kl_div(F.log_softmax(outputs.logits.float() / temperature, -1),
                                 F.log_softmax(teacher_logits.float() / temperature, -1),
                                 reduction="none", log_target=True).sum(-1)  # [B, S]
            loss = (per_token * (targets != -100)).sum() * temperature ** 2 / num_items_in_batch
            return (loss, outputs) if return_outputs else loss

    return LogitsKDTrainer


def setup(impl: str, vocab: int, layers: int, hidden: int, seq: int, batch: int, temperature: float
          ) -> Callable[[], None]:
    """Child-process setup for harness.measure: the models, the trainer, one batch; returns one
    optimizer step."""
    import torch
    import transformers

    from kdkernels.integrations.transformers import KDTrainer

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=seq)
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(config)
    teacher = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(prefix="kd_bench_"), report_to=[],
                                          use_cpu=True, per_device_train_batch_size=batch, disable_tqdm=True)
    trainer_class = KDTrainer if impl == "kdkernels" else _logits_kd_trainer_class()
    trainer = trainer_class(model=student, teacher=teacher, args=args, temperature=temperature,
                            log_loss_parts=False)
    input_ids = torch.randint(0, vocab, (batch, seq))
    batch_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    num_items = (input_ids[:, 1:] != -100).sum()
    optimizer = trainer.create_optimizer()

    def step() -> None:
        trainer.training_step(trainer.model, batch_inputs, num_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("hf_trainer", __doc__, v=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (default 1)")
    parser.add_argument("--time-budget", type=float, default=120.0,
                        help="stop a configuration's timed steps after this many seconds (min 3 steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    harness.add_output_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    rows = []
    kwargs = {"vocab": args.vocab, "layers": args.layers, "hidden": args.hidden, "seq": args.seq,
              "batch": args.batch, "temperature": args.temperature}
    for index, impl in enumerate(args.impls, 1):
        result = harness.measure("benchmarks.hf_trainer:setup", {"impl": impl, **kwargs}, repeat=args.repeat,
                                 warmup=args.warmup, time_budget_s=args.time_budget, threads=args.threads,
                                 label=f"[{index}/{len(args.impls)}] {impl}")
        rows.append({"impl": impl, **harness.result_fields(result)})
    eager = next((row for row in rows if row["impl"] == "eager" and "median_ms" in row), None)
    for row in rows:
        if eager and "median_ms" in row:
            row["x_time"] = row["median_ms"] / eager["median_ms"]
            row["x_peak"] = row["extra_peak_mib"] / eager["extra_peak_mib"] if eager["extra_peak_mib"] > 0 else None
    return {"rows": rows, "setup": _setup_line(args)}


def _setup_line(args: argparse.Namespace) -> str:
    import torch
    import transformers

    tokens = args.batch * args.seq
    logits_mib = tokens * args.vocab * 4 / harness.MIB
    return (f"KD trainer step, Llama student and teacher V={args.vocab} layers={args.layers} H={args.hidden}, "
            f"batch {args.batch} x seq {args.seq} (one fp32 [tokens, V] logits: {logits_mib:.0f} MiB), "
            f"T={args.temperature}, AdamW; {harness.cpu_model()}, "
            f"{args.threads or harness.available_cpus()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    columns = [harness.Column("impl", "impl"), harness.Column("median ms", "median_ms", ".0f"),
               harness.Column("x eager time", "x_time", ".2f"), harness.Column("min ms", "min_ms", ".0f"),
               harness.Column("extra peak MiB", "extra_peak_mib", ".0f"),
               harness.Column("x eager peak", "x_peak", ".2f"), harness.Column("steps", "steps")]
    if any("error" in row for row in results["rows"]):
        columns.append(harness.Column("note", "error"))
    harness.print_table(results["rows"], columns, markdown=args.markdown, title=results["setup"])
    if args.json:
        harness.write_json(args.json, {"args": vars(args), **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
