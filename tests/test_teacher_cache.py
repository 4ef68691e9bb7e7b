"""The teacher cache (kdkernels.teacher_cache): exact round trip, resumption after a killed writer
(same files as an uninterrupted run), refusal of truncated / corrupt shards, unfinished caches and
mismatched vocabularies, and the reader feeding sparse_kd_loss."""

from __future__ import annotations

import filecmp
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import kdkernels
from kdkernels import teacher_cache

pytest.importorskip("safetensors")

VOCAB, SEQ_LEN, N_SEQ, K = 29, 6, 10, 4


class TinyTeacher(nn.Module):
    """input ids [B, L] -> logits [B, L, V]; deterministic."""

    def __init__(self, vocab=VOCAB, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids))) * 3


def _data(seed=1):
    return torch.randint(0, VOCAB, (N_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _build(path, teacher=None, data=None, **options):
    options = {"k": K, "sequences_per_shard": 3, "batch_size": 2, "progress": False, **options}
    return teacher_cache.build_teacher_cache(teacher or TinyTeacher(), _data() if data is None else data, str(path),
                                             **options)


@pytest.mark.parametrize("values_dtype", ["float16", "bfloat16"])
def test_round_trip_is_bit_identical(tmp_path, values_dtype):
    teacher, data = TinyTeacher(), _data()
    summary = _build(tmp_path, teacher, data, values_dtype=values_dtype, temperature=1.5)
    with torch.no_grad():
        expected_values, expected_ids = torch.log_softmax(teacher(data) / 1.5, -1).topk(K, -1)
    dataset = teacher_cache.TeacherCacheDataset(str(tmp_path), vocab_size=VOCAB)
    assert len(dataset) == N_SEQ and dataset.k == K and dataset.generation_temperature == 1.5
    for i in range(N_SEQ):
        item = dataset[i]
        assert torch.equal(item["input_ids"], data[i])
        assert item["teacher_ids"].dtype == torch.int32
        assert torch.equal(item["teacher_ids"], expected_ids[i].int())
        stored = expected_values[i].to(teacher_cache.VALUE_DTYPES[values_dtype])
        assert item["teacher_logprobs"].dtype == stored.dtype
        assert torch.equal(item["teacher_logprobs"].view(torch.int16), stored.view(torch.int16))
    assert summary.tokens == N_SEQ * SEQ_LEN
    assert summary.bytes == sum(os.path.getsize(tmp_path / s["file"]) for s in dataset.shards)
    # per token: k int32 ids, k 2-byte values, one int32 input id, plus the headers
    assert K * 6 + 4 <= summary.bytes_per_token < K * 6 + 4 + 60


def test_killed_writer_resumes_to_the_same_files(tmp_path):
    _build(tmp_path / "whole")
    partial = tmp_path / "partial"
    _build(partial, stop_after_shards=2)
    with pytest.raises(ValueError, match="unfinished"):
        teacher_cache.TeacherCacheDataset(str(partial))
    # what a kill can leave besides: a temporary file, and a renamed shard not yet in the manifest
    (partial / "shard-00003.safetensors.tmp-123").write_bytes(b"half a shard")
    (partial / "shard-00002.safetensors").write_bytes(b"not recorded")
    _build(partial)
    whole_files = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(partial)) == whole_files
    for name in whole_files:
        assert filecmp.cmp(tmp_path / "whole" / name, partial / name, shallow=False), name


def test_writer_killed_by_the_os_resumes(tmp_path):
    # a real process death inside the teacher's forward (no cleanup runs), then a resume
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_teacher_cache import TinyTeacher, _build
        teacher = TinyTeacher()
        calls = [0]
        forward = teacher.forward
        def dying(ids):
            calls[0] += 1
            if calls[0] == 4:
                os._exit(3)
            return forward(ids)
        teacher.forward = dying
        _build({str(tmp_path / "killed")!r}, teacher)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 3
    _build(tmp_path / "killed")
    _build(tmp_path / "whole")
    for name in sorted(os.listdir(tmp_path / "whole")):
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "killed" / name, shallow=False), name


def test_truncated_shard_is_refused(tmp_path):
    _build(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        teacher_cache.TeacherCacheDataset(str(tmp_path))


@pytest.mark.parametrize("verify", ["sha256", "size"])
def test_corrupt_shard_is_refused(tmp_path, verify):
    _build(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if verify == "sha256":
        data[-3] ^= 0xFF  # same size, one value changed: only the hash sees it
    else:
        data[:8] = b"\xff" * 8  # the header length: not a safetensors file any more
    shard.write_bytes(bytes(data))
    dataset = teacher_cache.TeacherCacheDataset(str(tmp_path), verify=verify)
    dataset[0]  # shard 0 is intact
    with pytest.raises(ValueError, match="corrupt" if verify == "sha256" else "safetensors"):
        dataset[4]


def test_mismatched_vocabulary_is_refused(tmp_path):
    _build(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        teacher_cache.TeacherCacheDataset(str(tmp_path), vocab_size=VOCAB + 1)


def test_resume_with_other_settings_is_refused(tmp_path):
    _build(tmp_path, stop_after_shards=1)
    with pytest.raises(ValueError, match="k"):
        _build(tmp_path, k=K + 1)
    with pytest.raises(ValueError, match="data_hash"):
        _build(tmp_path, data=_data(seed=5))
    with pytest.raises(ValueError, match="teacher_hash"):
        _build(tmp_path, teacher=TinyTeacher(seed=9))


def test_cache_feeds_sparse_kd_loss(tmp_path):
    teacher, data = TinyTeacher(), _data()
    _build(tmp_path, teacher, data, values_dtype="float16")
    dataset = teacher_cache.TeacherCacheDataset(str(tmp_path), vocab_size=VOCAB)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    student = torch.randn(4, SEQ_LEN, VOCAB, generator=torch.Generator().manual_seed(2))
    loss = kdkernels.sparse_kd_loss(student, batch["teacher_ids"], batch["teacher_logprobs"],
                                    missing_mass="residual", teacher_temperature=dataset.generation_temperature)
    with torch.no_grad():
        values, ids = torch.log_softmax(teacher(data[:4]), -1).topk(K, -1)
    expected = kdkernels.sparse_kd_loss(student, ids, values, missing_mass="residual")
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-4)  # fp16 log-probs


def test_token_file_loading(tmp_path):
    stream = torch.arange(20)
    torch.save(stream, tmp_path / "tokens.pt")
    assert teacher_cache.load_token_file(str(tmp_path / "tokens.pt"), 6).shape == (3, 6)
    (tmp_path / "text.txt").write_bytes(b"abcdefgh")
    assert teacher_cache.load_token_file(str(tmp_path / "text.txt"), 4).tolist() == [[97, 98, 99, 100],
                                                                                     [101, 102, 103, 104]]


def test_trainer_sparse_teacher_run(tmp_path, capsys):
    from kdkernels.train.__main__ import main

    out = tmp_path / "out"
    flags = ["--quick", "--no-progress", "--steps", "20", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*flags, "--sparse-teacher", "4"]) == 0
    table = capsys.readouterr().out
    assert "kd-top4" in table and "KD top-4 residual" in table
    import json

    runs = {run["name"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"baseline", "kd", "kd-top4"} and math.isfinite(runs["kd-top4"]["val_loss"])
    # a second invocation reuses the cache it names
    cache_dir = runs["kd-top4"]["teacher_cache"]
    assert main([*flags, "--teacher-cache", cache_dir]) == 0
    assert "kd-top4" in capsys.readouterr().out
