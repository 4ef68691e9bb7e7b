"""TRL's GKD loss on kdkernels' fused kernel: swap one import.

kdkernels.integrations.trl.generalized_jsd_loss takes TRL GKDTrainer.generalized_jsd_loss's
arguments and gives its values (beta = 0 forward KL, beta = 1 reverse KL, the generalized JSD
between, TRL's masking and reductions). With TRL installed, make GKDTrainer use it:

    from trl.experimental.gkd import GKDTrainer          # or: from trl import GKDTrainer
    from kdkernels.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

This script does that when TRL is installed, and runs a few GKD-style steps (student and teacher
logits on the same batch, shifted labels) with the swapped loss either way.

    python examples/trl_gkd_swap.py
"""

import torch

from kdkernels.integrations.trl import generalized_jsd_loss
from tiny_models import student_and_teacher, toy_batches

try:
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    print("TRL GKDTrainer now computes its loss with kdkernels")
except ImportError:
    print("TRL is not installed: running the GKD loss in a plain loop")

student, teacher = student_and_teacher()
optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
for step, batch, inputs in toy_batches(steps=6):
    student_logits = student(**inputs).logits[:, :-1]       # [B, S-1, V]: position i predicts token i + 1
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    loss = generalized_jsd_loss(student_logits, teacher_logits, batch["labels"][:, 1:], beta=0.5, temperature=1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"step {step}: generalized JSD {loss.item():.4f}")
