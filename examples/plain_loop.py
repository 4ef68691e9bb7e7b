"""Distil a teacher into a student in a plain PyTorch loop with the fused lm_head + KD loss.

The student's logits are never materialised: the loss takes its final hidden states and lm_head
weight, and the teacher's, and works through the tokens in chunks.

    python examples/plain_loop.py
"""

import torch

import kdkernels
from tiny_models import student_and_teacher, toy_batches

student, teacher = student_and_teacher()
optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)

for step, batch, inputs in toy_batches(steps=10):
    # position i predicts token i + 1: shift the labels, nothing to predict at the last position
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    hidden = student.model(**inputs).last_hidden_state              # [B, S, H_s]
    with torch.no_grad():
        teacher_hidden = teacher.model(**inputs).last_hidden_state  # [B, S, H_t]
    loss = kdkernels.fused_linear_kd_loss(
        hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, targets,
        temperature=2.0, kd_weight=0.5, ce_weight=0.5)              # mean over predicted tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"step {step}: loss {loss.item():.4f}")
