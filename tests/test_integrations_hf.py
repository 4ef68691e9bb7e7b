"""KDTrainer and kd_loss_func on tiny random transformers models: one step against a float64
reference (loss and every student gradient), gradient accumulation, logit scale / soft cap,
checkpoint save and resume, the logged loss parts."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import kdkernels  # noqa: E402
from kdkernels.integrations.transformers import KDTrainer, kd_loss_func  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from tiny_models import collate  # noqa: E402  (right padding: input_ids 0, attention_mask 0, labels -100)

transformers.logging.set_verbosity_error()

HIDDEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)


def llama(vocab, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **HIDDEN))


def gpt2(vocab, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def gemma2(vocab, seed=0, softcap=3.0):
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(vocab_size=vocab, head_dim=8,
                                                                    final_logit_softcapping=softcap, **HIDDEN))


def cohere(vocab, seed=0, logit_scale=0.25):
    torch.manual_seed(seed)
    return transformers.CohereForCausalLM(transformers.CohereConfig(vocab_size=vocab, logit_scale=logit_scale,
                                                                    **HIDDEN))


def sequences(n, vocab, seed=0):
    """n examples of uneven lengths; the first tokens of each are a prompt (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 5 + (7 * i) % 9
        ids = torch.randint(0, vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def training_args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                   max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                   weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                   disable_tqdm=True, seed=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


# --- the float64 reference: full logits from each model, then the KD formula ----------------


def divergence_rows(student_logits, teacher_logits, divergence, temperature, beta):
    """Per-token divergence D(p || q) at temperature T, p the teacher's and q the student's."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
        return (beta * torch.where(p > 0, p * (log_p - log_m), 0.0) + (1 - beta) * q * (log_q - log_m)).sum(-1)
    raise AssertionError(divergence)


def reference_step(student, teacher, batch, *, dtype, divergence="forward_kl", temperature=1.0, beta=0.5,
                   kd_weight=1.0, ce_weight=0.0):
    """(loss, {name: grad}) of the student, with both models copied to `dtype`: the loss is the sum
    over predicted tokens (labels shifted as transformers does) over their count."""
    student = copy.deepcopy(student).to(dtype).train()
    teacher = copy.deepcopy(teacher).to(dtype).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] >= vocab:
        teacher_logits = teacher_logits[..., :vocab]
    else:
        teacher_logits = F.pad(teacher_logits, (0, vocab - teacher_logits.shape[-1]), value=-math.inf)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    kd = divergence_rows(student_logits[keep], teacher_logits[keep], divergence, temperature, beta)
    ce = F.cross_entropy(student_logits[keep], targets[keep], reduction="none")
    loss = (kd_weight * temperature ** 2 * kd + ce_weight * ce).sum() / keep.sum()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in student.named_parameters() if p.grad is not None}


def trainer_step(trainer, batch):
    """One KD training step as the Trainer runs it: (loss, num_items_in_batch, {name: grad})."""
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, batches[0], num_items)
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, num_items, grads


def assert_within_eager_error(actual, eager, reference, what):
    """The fused loss's error against float64 is at most twice eager float32's (plus a floor)."""
    error = float((actual.double() - reference).abs().max())
    eager_error = float((eager.double() - reference).abs().max())
    floor = 16 * torch.finfo(torch.float32).eps * max(float(reference.abs().max()), 1e-3)
    assert error <= 2 * eager_error + floor, f"{what}: error {error:.3g} > 2 x eager {eager_error:.3g} + {floor:.3g}"


def assert_step_matches_reference(loss, grads, student, teacher, batch, **options):
    ref_loss, ref_grads = reference_step(student, teacher, batch, dtype=torch.float64, **options)
    eager_loss, eager_grads = reference_step(student, teacher, batch, dtype=torch.float32, **options)
    assert_within_eager_error(loss, eager_loss, ref_loss, "loss")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_within_eager_error(grad, eager_grads[name], ref_grads[name], name)


PAIRS = {
    # (student, teacher, options): vocabularies of different sizes, architectures mixed
    "llama<-llama, larger teacher vocab": (lambda: llama(96), lambda: llama(128, seed=1),
                                           dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5)),
    "gpt2<-gpt2, smaller teacher vocab": (lambda: gpt2(128), lambda: gpt2(96, seed=1),
                                          dict(divergence="jsd", beta=0.3, temperature=1.5)),
    "gpt2<-llama": (lambda: gpt2(96), lambda: llama(96, seed=1), dict(ce_weight=0.25)),
    # logit transforms: the same soft cap on both; a logit scale folded into the teacher; different caps
    "gemma2 softcap<-gemma2 softcap": (lambda: gemma2(96), lambda: gemma2(96, seed=1), dict(temperature=2.0)),
    "cohere logit_scale<-llama": (lambda: cohere(96), lambda: llama(96, seed=1), dict(ce_weight=0.5)),
    "gemma2 softcap<-cohere logit_scale": (lambda: gemma2(96), lambda: cohere(96, seed=1, logit_scale=0.5),
                                           dict(temperature=2.0, ce_weight=0.5)),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_step_matches_float64_reference(pair, tmp_path):
    make_student, make_teacher, options = PAIRS[pair]
    student, teacher = make_student(), make_teacher()
    batch = collate(sequences(4, 96))
    trainer = KDTrainer(model=copy.deepcopy(student), teacher=copy.deepcopy(teacher), args=training_args(tmp_path),
                        **options)
    loss, num_items, grads = trainer_step(trainer, batch)
    assert int(num_items) == int((batch["labels"][:, 1:] != -100).sum())  # counted over the shifted labels
    assert_step_matches_reference(loss, grads, student, teacher, batch, **options)


def test_logit_transforms_change_the_loss(tmp_path):
    """The soft cap / logit scale cases above test something: without them the loss differs."""
    batch = collate(sequences(4, 96))
    losses = []
    for softcap, logit_scale in ((3.0, 0.5), (None, 1.0)):  # the same weights, with and without
        trainer = KDTrainer(model=gemma2(96, softcap=softcap), teacher=cohere(96, seed=1, logit_scale=logit_scale),
                            args=training_args(tmp_path), temperature=2.0)
        losses.append(float(trainer_step(trainer, batch)[0]))
    assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[0])


KD_OPTIONS = dict(temperature=2.0, kd_weight=0.7, ce_weight=0.3)


def train_once(tmp_path, student, teacher, examples, trainer="KDTrainer", **args):
    """A fresh copy of `student` trained by KDTrainer, or by transformers.Trainer with kd_loss_func."""
    model, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    common = dict(model=model, args=training_args(tmp_path, **args), train_dataset=examples, data_collator=collate)
    if trainer == "KDTrainer":
        trainer = KDTrainer(teacher=teacher, **common, **KD_OPTIONS)
    else:
        trainer = transformers.Trainer(compute_loss_func=kd_loss_func(teacher, model, **KD_OPTIONS), **common)
    result = trainer.train()
    return trainer, result


@pytest.mark.parametrize("trainer", ["KDTrainer", "compute_loss_func"])
def test_gradient_accumulation_equals_one_big_batch(trainer, tmp_path):
    """4 micro-batches of 2 (each padded to its own length) make the same SGD update as one
    batch of 8; the logged training loss is the same too."""
    student, teacher = llama(96), llama(128, seed=1)
    examples = sequences(8, 96)
    big, big_result = train_once(tmp_path / "big", student, teacher, examples, trainer,
                                 per_device_train_batch_size=8)
    small, small_result = train_once(tmp_path / "small", student, teacher, examples, trainer,
                                     per_device_train_batch_size=2, gradient_accumulation_steps=4)
    moved = 0.0
    with torch.no_grad():
        for (name, p_big), p_small, p_start in zip(big.model.named_parameters(), small.model.parameters(),
                                                   student.parameters()):
            assert float((p_big - p_small).abs().max()) <= 1e-5, name
            moved = max(moved, float((p_big - p_start).abs().max()))
    assert moved > 1e-3  # the step did something
    assert abs(big_result.training_loss - small_result.training_loss) <= 1e-5


def test_logs_kd_and_ce_parts(tmp_path):
    student, teacher = llama(96), llama(96, seed=1)
    examples = sequences(8, 96)
    trainer, _ = train_once(tmp_path, student, teacher, examples, per_device_train_batch_size=4,
                            gradient_accumulation_steps=2)
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged["loss"] == pytest.approx(0.7 * logged["kd_loss"] + 0.3 * logged["ce_loss"], rel=1e-4)
    batch = collate(examples)  # the one step saw all 8 examples
    ce, _ = reference_step(student, teacher, batch, dtype=torch.float64, kd_weight=0.0, ce_weight=1.0)
    assert logged["ce_loss"] == pytest.approx(float(ce), rel=1e-4)


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    student, teacher = llama(96), llama(96, seed=1)
    examples = sequences(8, 96)
    straight, _ = train_once(tmp_path / "straight", student, teacher, examples, per_device_train_batch_size=2,
                             max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.1)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    # the checkpoint is the student alone (the teacher is not saved) and loads as one
    reloaded = transformers.LlamaForCausalLM.from_pretrained(checkpoint)
    assert set(reloaded.state_dict()) == set(student.state_dict())
    resumed = KDTrainer(model=copy.deepcopy(student), teacher=copy.deepcopy(teacher),
                        args=training_args(tmp_path / "resumed", per_device_train_batch_size=2, max_steps=4,
                                           learning_rate=0.1),
                        train_dataset=examples, data_collator=collate, **KD_OPTIONS)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, p_straight), p_resumed in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p_resumed, p_straight, rtol=0, atol=1e-6, msg=name)


def test_kd_loss_func_in_a_plain_trainer(tmp_path):
    student, teacher = llama(96), llama(128, seed=1)
    batch = collate(sequences(4, 96))
    model = copy.deepcopy(student)
    loss_func = kd_loss_func(copy.deepcopy(teacher), model, temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), compute_loss_func=loss_func)
    loss, num_items, grads = trainer_step(trainer, batch)
    assert int(num_items) == int((batch["labels"][:, 1:] != -100).sum())
    assert_step_matches_reference(loss, grads, student, teacher, batch, temperature=2.0, kd_weight=0.5,
                                  ce_weight=0.5)
    loss_func.remove()


def test_batch_without_labels_is_refused(tmp_path):
    trainer = KDTrainer(model=llama(96), teacher=llama(96, seed=1), args=training_args(tmp_path))
    batch = collate(sequences(2, 96))
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


def test_teacher_is_frozen_and_placed_like_the_student(tmp_path):
    student = llama(96).to(torch.bfloat16)
    trainer = KDTrainer(model=student, teacher=llama(96, seed=1), args=training_args(tmp_path))
    teacher = trainer.teacher.model
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())


class LogitsInBatch:
    """A TeacherSource whose teacher logits come with the batch (as a cache would put them)."""

    batch_keys = ("teacher_logits",)

    def kd_loss_sum(self, student, targets, batch, options):
        assert "teacher_logits" in batch and "labels" not in batch
        return kdkernels.fused_linear_kd_loss(student.hidden, student.weight, labels=targets,
                                              teacher_logits=batch["teacher_logits"], reduction="sum",
                                              **options.loss_kwargs())


def test_teacher_source_extension_point(tmp_path):
    """A teacher that is not a model: its batch entries reach it and not the student's forward."""
    student, teacher = llama(96), llama(96, seed=1)
    batch = collate(sequences(4, 96))
    options = dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from_model = trainer_step(KDTrainer(model=copy.deepcopy(student), teacher=teacher, args=training_args(tmp_path),
                                        **options), batch)
    from_batch = trainer_step(KDTrainer(model=copy.deepcopy(student), teacher=LogitsInBatch(),
                                        args=training_args(tmp_path), **options),
                              {**batch, "teacher_logits": teacher_logits})
    torch.testing.assert_close(from_batch[0], from_model[0])
    for name, grad in from_model[2].items():
        torch.testing.assert_close(from_batch[2][name], grad, msg=name)
