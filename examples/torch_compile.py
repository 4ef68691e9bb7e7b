"""A compiled training step that calls kdkernels' losses: no graph break, the same values as eager.

The compiled CPU / GPU kernels are registered torch ops with fake (meta) implementations, so
torch.compile(fullgraph=True) traces a step that calls kd_loss or fused_linear_kd_loss into one
graph around them.

    python examples/torch_compile.py
"""

import torch

import kdkernels
from tiny_models import VOCAB

torch.manual_seed(0)
hidden_size, tokens = 64, 96
student_head = torch.nn.Linear(hidden_size, VOCAB, bias=False)
teacher_head = torch.nn.Linear(2 * hidden_size, VOCAB, bias=False).requires_grad_(False)
student_hidden = torch.randn(tokens, hidden_size, requires_grad=True)
teacher_hidden = torch.randn(tokens, 2 * hidden_size)
labels = torch.randint(0, VOCAB, (tokens,))
labels[::7] = -100


def kd_step(student_hidden, teacher_hidden, labels):
    """KD from logits."""
    return kdkernels.kd_loss(student_head(student_hidden), teacher_head(teacher_hidden), labels,
                             temperature=2.0, kd_weight=0.5, ce_weight=0.5)


def fused_step(student_hidden, teacher_hidden, labels):
    """KD from hidden states and lm_head weights, the logits never materialised."""
    return kdkernels.fused_linear_kd_loss(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                                          labels, temperature=2.0, kd_weight=0.5, ce_weight=0.5)


def loss_and_grads(step):
    loss = step(student_hidden, teacher_hidden, labels)
    grads = torch.autograd.grad(loss, (student_hidden, student_head.weight))
    return loss.detach(), grads


for name, step in (("kd_loss", kd_step), ("fused_linear_kd_loss", fused_step)):
    explanation = torch._dynamo.explain(step)(student_hidden, teacher_hidden, labels)
    eager = loss_and_grads(step)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(compiled, eager)
    print(f"{name}: {explanation.graph_break_count} graph breaks; compiled loss {compiled[0].item():.6f} "
          f"== eager {eager[0].item():.6f}, gradients equal")
