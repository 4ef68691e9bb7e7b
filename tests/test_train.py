"""The reference trainer: end to end on its quick preset, sweeps, determinism, Hugging Face
checkpoints, and the student's loss against the formula it documents."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.train import data, experiments, loop, models
from kdkernels.train.__main__ import main

# Student steps for the tests that check run lists, not learning.
FEW_STEPS = ["--steps", "6"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One teacher cache for the module: the quick teacher is trained once."""
    return str(tmp_path_factory.mktemp("teacher-cache"))


def run_trainer(out_dir, cache_dir, *flags):
    assert main(["--quick", "--no-progress", "--out", str(out_dir), "--cache-dir", cache_dir, *flags]) == 0
    with open(os.path.join(out_dir, "results.json")) as handle:
        return json.load(handle)


def names(results):
    return [run["name"] for run in results["runs"]]


def test_quick_run_writes_results_table_and_plot(tmp_path, cache_dir, capsys):
    results = run_trainer(tmp_path, cache_dir)
    assert names(results) == ["baseline", "kd"]
    baseline, kd = results["runs"]
    assert baseline["kind"] == "ce" and kd["kind"] == "kd"
    for run in results["runs"]:
        for key in ("val_loss", "perplexity", "top1_agreement", "wall_time_s", "peak_rss_mib"):
            assert isinstance(run[key], float), key
        assert run["perplexity"] == pytest.approx(torch.tensor(run["val_loss"]).exp().item())
        assert 0.0 <= run["top1_agreement"] <= 1.0
        assert run["curve"][-1] == [run["steps"], run["val_loss"]]
    assert results["teacher"]["source"] == "trained"
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    printed = capsys.readouterr().out
    assert "val loss" in printed and "top-1 agree" in printed and "baseline" in printed
    # --quick says what it is, before the table and after the verdict
    assert printed.count("a smoke test") == 2 and "Smoke test (--quick), teacher" in printed
    assert "2 student runs of 60 steps" in printed
    assert results["smoke_test"] is True


def test_same_seed_same_numbers_and_cached_teacher(tmp_path, cache_dir):
    first = run_trainer(tmp_path / "a", cache_dir, *FEW_STEPS)
    second = run_trainer(tmp_path / "b", cache_dir, *FEW_STEPS)
    assert first["teacher"]["source"] == second["teacher"]["source"] == "cache"
    assert [r["val_loss"] for r in first["runs"]] == [r["val_loss"] for r in second["runs"]]
    assert [r["curve"] for r in first["runs"]] == [r["curve"] for r in second["runs"]]
    cached = sorted(os.listdir(cache_dir))
    other_seed = run_trainer(tmp_path / "c", cache_dir, *FEW_STEPS, "--seed", "1", "--no-cache",
                             "--teacher-steps", "10")
    assert sorted(os.listdir(cache_dir)) == cached  # --no-cache leaves nothing behind
    assert other_seed["runs"][0]["val_loss"] != first["runs"][0]["val_loss"]


def test_sweeps_give_one_row_per_value_and_never_repeat_the_default_run(tmp_path, cache_dir, capsys):
    results = run_trainer(tmp_path, cache_dir, *FEW_STEPS, "--sweep-temperature", "1,2,5,10",
                          "--sweep-kd-weight", "0.1,0.5,0.9")
    # The preset KD run is T=1, λ=0.5: the sweeps' kd-T1 and kd-lambda0.5 are that run, run once.
    assert names(results) == ["baseline", "kd", "kd-T2", "kd-T5", "kd-T10", "kd-lambda0.1", "kd-lambda0.9"]
    by_name = {run["name"]: run for run in results["runs"]}
    assert by_name["kd"]["also"] == ["kd-T1", "kd-lambda0.5"]
    assert (by_name["kd"]["temperature"], by_name["kd"]["kd_weight"]) == (1.0, 0.5)
    assert [by_name[f"kd-T{t}"]["temperature"] for t in (2, 5, 10)] == [2.0, 5.0, 10.0]
    assert [by_name[f"kd-lambda{w}"]["kd_weight"] for w in (0.1, 0.9)] == [0.1, 0.9]
    printed = capsys.readouterr().out
    assert "7 student runs of 6 steps" in printed  # the header counts the runs that run
    assert "kd-T1, kd-lambda0.5: the same run as kd" in printed


def test_losses_divergences_feature_alignment_and_sizes(tmp_path, cache_dir):
    results = run_trainer(tmp_path, cache_dir, *FEW_STEPS, "--divergence", "forward_kl,reverse_kl",
                          "--loss", "kd,dkd", "--cakd", "--feature-align", "cosine", "--student-sizes", "1x16")
    assert names(results) == ["baseline", "kd-forward_kl", "kd-reverse_kl", "dkd", "cakd", "kd+cosine",
                              "baseline@1x16", "kd@1x16"]
    by_name = {run["name"]: run for run in results["runs"]}
    assert by_name["kd+cosine"]["feature_align"] == "cosine"
    assert by_name["kd@1x16"]["student_parameters"] < by_name["kd-forward_kl"]["student_parameters"]
    assert all(torch.isfinite(torch.tensor(run["val_loss"])) for run in results["runs"])


def test_data_file(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(text)
    results = run_trainer(tmp_path / "out", str(tmp_path / "cache"), "--data", str(corpus_file),
                          "--teacher-steps", "10", *FEW_STEPS)
    assert results["corpus"] == str(corpus_file)
    assert names(results) == ["baseline", "kd"]


def _save_tiny_hf(path, family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=48)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return str(path)


def test_hugging_face_checkpoints(tmp_path, cache_dir):
    teacher = _save_tiny_hf(tmp_path / "gpt2-teacher", "gpt2")
    student = _save_tiny_hf(tmp_path / "llama-student", "llama")
    results = run_trainer(tmp_path / "hf", cache_dir, *FEW_STEPS, "--teacher", teacher, "--student", student,
                          "--feature-align", "mse")
    assert names(results) == ["baseline", "kd", "kd+mse"]
    assert results["teacher"]["source"] == "checkpoint"
    assert results["context"] == 32  # the quick preset's, within both checkpoints' positions
    assert {run["student"] for run in results["runs"]} == {"llama-student"}
    # A built-in student distilled from the checkpoint teacher.
    mixed = run_trainer(tmp_path / "mixed", cache_dir, *FEW_STEPS, "--teacher", teacher)
    assert names(mixed) == ["baseline", "kd"]


@pytest.mark.parametrize("flags, message", [
    (["--kd-weight", "1.5"], "kd-weight"),
    (["--temperature", "0"], "temperature"),
    (["--divergence", "hellinger"], "divergence"),
    (["--loss", "kd,mse"], "loss"),
    (["--steps", "0"], "steps"),
    (["--sweep-temperature", "1,x"], "sweep-temperature"),
    (["--teacher", "/nonexistent/checkpoint"], "no such file"),
])
def test_bad_flags_exit_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", *flags])
    assert message in capsys.readouterr().err


def _tiny_pair(vocab=11, context=6):
    torch.manual_seed(0)
    teacher = models.TinyTransformer(models.TransformerConfig(vocab_size=vocab, context=context, layers=1,
                                                              d_model=16, heads=2))
    student = models.TinyTransformer(models.TransformerConfig(vocab_size=vocab, context=context, layers=1,
                                                              d_model=8, heads=2))
    ids = torch.randint(0, vocab, (3, context + 1))
    return experiments.freeze(teacher), student, ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("temperature, kd_weight", [(1.0, 0.5), (2.0, 0.1), (5.0, 0.9), (3.0, 1.0)])
def test_student_loss_is_the_documented_blend(temperature, kd_weight):
    """(1 - λ)·CE + λ·T²·KL(p_T || q_T), whichever kdkernels path computes it."""
    teacher, student, inputs, targets = _tiny_pair()
    spec = loop.LossSpec(kind="kd", temperature=temperature, kd_weight=kd_weight)
    loss = loop.student_objective(spec, student, teacher, inputs, targets)
    student_logits = student(inputs).flatten(0, 1)
    teacher_logits = teacher(inputs).flatten(0, 1)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                  log_target=True, reduction="batchmean")
    expected = (1 - kd_weight) * F.cross_entropy(student_logits, targets.reshape(-1)) + \
        kd_weight * temperature ** 2 * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    baseline = loop.student_objective(loop.LossSpec(kind="ce"), student, None, inputs, targets)
    torch.testing.assert_close(baseline, F.cross_entropy(student_logits, targets.reshape(-1)))


def test_student_loss_with_feature_alignment_adds_the_hint():
    teacher, student, inputs, targets = _tiny_pair()
    align = kdkernels.nn.FeatureAlignmentLoss(8, 16, kind="mse")
    spec = loop.LossSpec(kind="kd", feature_align="mse", feature_weight=0.25)
    with_hint = loop.student_objective(spec, student, teacher, inputs, targets, align)
    without = loop.student_objective(loop.LossSpec(kind="kd"), student, teacher, inputs, targets)
    hint = align(student.hidden_states(inputs), teacher.hidden_states(inputs))
    torch.testing.assert_close(with_hint, without + 0.25 * hint)
    with_hint.backward()
    assert align.projection.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_batches_and_split_are_fixed():
    corpus = data.load_corpus(max_bytes=5000)
    assert len(corpus.train) == 4500 and len(corpus.validation) == 500 and corpus.vocab_size == 256
    first = list(data.train_batches(corpus.train, batch_size=2, context=8, steps=3, seed=5))
    again = list(data.train_batches(corpus.train, batch_size=2, context=8, steps=3, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and first[0].shape == (2, 9)
    windows = data.validation_windows(corpus.validation, context=8)
    assert windows.shape == (62, 9) and torch.equal(windows[1, 0], windows[0, -1])
    with pytest.raises(ValueError, match="too short"):
        data.load_corpus(max_bytes=100, min_tokens=64)


def test_lr_schedule_warms_up_then_decays():
    optim = loop.OptimSettings(steps=100, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    rates = [optim.lr_at(step) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] >= 0.1
