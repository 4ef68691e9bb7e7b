"""Distil with Hugging Face's Trainer: kdkernels' KDTrainer.

KDTrainer is a transformers.Trainer: the same arguments, callbacks, checkpoints and logging, plus
a teacher and the KD options. Its loss never materialises the [tokens, vocab] logits and is
normalised over the whole accumulated batch, so gradient accumulation gives the same update as
one big batch. The logs carry the KD and CE parts of the loss.

    python examples/hf_kd_trainer.py
"""

import tempfile

import transformers

from kdkernels.integrations.transformers import KDTrainer
from tiny_models import collate, tiny_llama, toy_examples

args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="kd_trainer_"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
    max_steps=4, learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    disable_tqdm=True)
trainer = KDTrainer(
    model=tiny_llama(layers=2, seed=0), teacher=tiny_llama(layers=4, seed=1), args=args,
    train_dataset=toy_examples(), data_collator=collate,
    temperature=2.0, kd_weight=0.5, ce_weight=0.5, divergence="forward_kl")
trainer.train()
for entry in trainer.state.log_history:
    if "loss" in entry:
        print(f"step {entry['step']}: loss {entry['loss']:.4f} = 0.5 x kd {entry['kd_loss']:.4f} "
              f"+ 0.5 x ce {entry['ce_loss']:.4f}")
