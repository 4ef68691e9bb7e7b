"""Tiny randomly initialised causal LMs and a toy dataset for the examples: built from configs,
nothing is downloaded. Replace them with your own models (``AutoModelForCausalLM.from_pretrained``)
and data."""

from __future__ import annotations

import torch

VOCAB = 512


def tiny_llama(vocab: int = VOCAB, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A random LlamaForCausalLM (the teacher gets more layers than the student in the examples)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def toy_examples(n: int = 32, vocab: int = VOCAB, seed: int = 0):
    """n examples {"input_ids", "labels"} of 8..23 tokens; each one's first 3 tokens are a prompt
    (label -100: not predicted)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(0, vocab, (8 + (5 * i) % 16,), generator=generator)
        labels = ids.clone()
        labels[:3] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(examples):
    """Right-padded batch: input_ids 0, attention_mask 0, labels -100 on the padding."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.zeros(len(examples), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
             "labels": torch.full((len(examples), width), -100, dtype=torch.long)}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = example["labels"]
    return batch


def student_and_teacher():
    """The plain loops' pair: a 2-layer student and a 4-layer teacher, frozen (eval mode, no gradients)."""
    student, teacher = tiny_llama(layers=2, seed=0), tiny_llama(layers=4, seed=1)
    return student, teacher.eval().requires_grad_(False)


def toy_batches(steps: int, batch_size: int = 8):
    """`steps` right-padded batches (see collate) cycling through toy_examples(): yields (step, batch,
    the model inputs of the batch: input_ids and attention_mask)."""
    examples = toy_examples()
    for step in range(steps):
        batch = collate(examples[(step * batch_size) % len(examples):][:batch_size])
        yield step, batch, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
