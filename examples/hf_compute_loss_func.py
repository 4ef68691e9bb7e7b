"""Keep your transformers.Trainer and pass kdkernels' KD loss as its compute_loss_func.

The student computes its logits as usual; kd_loss_func runs the teacher on the same batch and
calls kdkernels.kd_loss on both logits (fused: one pass, the gradient written in the forward).

    python examples/hf_compute_loss_func.py
"""

import tempfile

import transformers

from kdkernels.integrations.transformers import kd_loss_func
from tiny_models import collate, tiny_llama, toy_examples

student, teacher = tiny_llama(layers=2, seed=0), tiny_llama(layers=4, seed=1)
args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="kd_loss_func_"), per_device_train_batch_size=8, max_steps=4,
    learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
trainer = transformers.Trainer(
    model=student, args=args, train_dataset=toy_examples(), data_collator=collate,
    compute_loss_func=kd_loss_func(teacher, student, divergence="reverse_kl", temperature=1.0,
                                   kd_weight=0.8, ce_weight=0.2))
trainer.train()
print("losses:", [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry])
