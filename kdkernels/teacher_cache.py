"""A teacher's top-k log-probabilities on disk: run the teacher once, distil from the cache.

Format (a directory; ``FORMAT_VERSION`` below):

    manifest.json              what was cached and how, and every finished shard
    shard-00000.safetensors    sequences [s0, s1) of the data, three tensors:
        input_ids      [n, L]    int32    the tokens the teacher read
        topk_ids       [n, L, k] int32    per position, the teacher's k most probable next tokens
        topk_logprobs  [n, L, k] fp16/bf16 their log-probabilities at the generation temperature,
                                          over the full vocabulary (descending)
    shard-00001.safetensors    ...

The manifest holds ``format``, ``format_version``, ``vocab_size``, ``k``,
``generation_temperature``, ``values_dtype``, ``seq_len``, ``sequences_per_shard``,
``num_sequences``, ``teacher_hash`` (sha256 of the teacher's config), ``data_hash`` (sha256 of
the input ids), ``complete``, and per shard its file name, sequence range, byte size and sha256.

safetensors: a JSON header then raw little-endian arrays, so a reader memory-maps a shard and
slices one sequence without loading the file, and nothing is unpickled.

Writes are atomic per shard: each shard is written to a temporary file, flushed, renamed into
place, and only then recorded in the manifest (itself replaced atomically). A killed writer
leaves at most a temporary file (removed on resume) or a shard not yet in the manifest
(rewritten on resume), so a rerun with the same teacher and data continues where it stopped and
produces the same bytes as an uninterrupted run. The reader refuses a shard whose size or sha256
differs from the manifest's (truncated or corrupt), a cache of another vocabulary size, and an
unfinished cache.

    python -m kdkernels.teacher_cache --teacher CKPT --data FILE --k 64 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from kdkernels._optional import import_extra

FORMAT = "kdkernels-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_HASH_BLOCK = 1 << 20


def _safetensors():
    return (import_extra("safetensors.torch", "the teacher cache"),
            import_extra("safetensors", "the teacher cache").safe_open)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def teacher_hash(teacher: nn.Module, config: Union[None, str, Dict[str, Any]] = None) -> str:
    """sha256 of the teacher's config: `config` if given, else a Hugging Face model's
    ``config.to_json_string()``, else the module's structure and parameter values."""
    if config is None and hasattr(teacher, "config") and hasattr(teacher.config, "to_json_string"):
        config = teacher.config.to_json_string()
    digest = hashlib.sha256()
    if config is not None:
        digest.update((config if isinstance(config, str) else json.dumps(config, sort_keys=True)).encode())
        return digest.hexdigest()
    digest.update(repr(teacher).encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_write_bytes(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_manifest(directory: str, manifest: dict) -> None:
    _atomic_write_bytes(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def _teacher_logits(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits of a module that returns logits or an object with ``.logits`` (HF)."""
    out = teacher(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError("the teacher must return logits [B, L, V] (or an object with .logits) for input ids "
                         f"[B, L] = {tuple(input_ids.shape)}")
    return logits


@dataclass(frozen=True)
class CacheSummary:
    """What build_teacher_cache wrote: where, how many tokens and bytes."""

    path: str
    num_sequences: int
    tokens: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def build_teacher_cache(teacher: nn.Module, input_ids: torch.Tensor, out_dir: str, *, k: int = 64,
                        temperature: float = 1.0, values_dtype: str = "float16", batch_size: int = 8,
                        sequences_per_shard: int = 256, teacher_config: Union[None, str, Dict[str, Any]] = None,
                        vocab_size: Optional[int] = None, device: Union[str, torch.device, None] = None,
                        progress: bool = True, stop_after_shards: Optional[int] = None) -> CacheSummary:
    """Runs `teacher` over `input_ids` once and writes its top-k log-probabilities to `out_dir`.

    Args:
        teacher: an ``nn.Module`` mapping input ids ``[B, L]`` to logits ``[B, L, V]`` (or a
            Hugging Face causal LM, whose output has ``.logits``). Run in eval mode, no grad.
        input_ids: integer ``[num_sequences, L]``: the token sequences to cache.
        out_dir: the cache directory (created; an unfinished cache of the same teacher, data and
            settings there is resumed; a different one is refused).
        k: ids kept per position (1 <= k <= V).
        temperature: the generation temperature T_gen of the stored log-probs:
            ``log_softmax(logits / T_gen)``; pass it as ``teacher_temperature`` to the loss.
        values_dtype: ``"float16"`` or ``"bfloat16"`` for the log-probs.
        batch_size: sequences per teacher call.
        sequences_per_shard: sequences per shard file (the unit of atomic writes and resumption).
        teacher_config: what identifies the teacher in the manifest's hash (default: an HF model's
            config, else the module's structure and weights).
        vocab_size: the vocabulary size to record (default: the logits' last dimension).
        device: where the teacher runs (default: its parameters' device).
        progress: show a progress bar; print the bytes per token at the end.
        stop_after_shards: write at most this many new shards, then return (tests use it to stand
            in for a killed writer).

    Returns:
        A :class:`CacheSummary`.
    """
    safetensors_torch, _ = _safetensors()
    for name, value in (("k", k), ("batch_size", batch_size), ("sequences_per_shard", sequences_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if values_dtype not in VALUE_DTYPES:
        raise ValueError(f"values_dtype must be one of {tuple(VALUE_DTYPES)}, got {values_dtype!r}")
    if not (isinstance(temperature, (int, float)) and 1e-6 <= float(temperature) <= 1e6):
        raise ValueError(f"temperature must be a number in [1e-6, 1e6], got {temperature!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be an integer tensor [num_sequences, seq_len]")
    input_ids = input_ids.detach().to("cpu", torch.int32).contiguous()
    if device is None:
        device = next(iter(teacher.parameters()), torch.empty(0)).device
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a killed writer's temporary files
        if ".tmp-" in name:
            os.remove(os.path.join(out_dir, name))

    num_sequences, seq_len = input_ids.shape
    settings = dict(format=FORMAT, format_version=FORMAT_VERSION, k=k, generation_temperature=float(temperature),
                    values_dtype=values_dtype, seq_len=seq_len, sequences_per_shard=sequences_per_shard,
                    num_sequences=num_sequences, teacher_hash=teacher_hash(teacher, teacher_config),
                    data_hash=_sha256_tensor(input_ids))
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = dict(settings, vocab_size=vocab_size, complete=False, shards=[])
    if os.path.exists(manifest_path):
        with open(manifest_path) as handle:
            existing = json.load(handle)
        differs = [key for key, value in settings.items() if existing.get(key) != value]
        if vocab_size is not None and existing.get("vocab_size") not in (None, vocab_size):
            differs.append("vocab_size")
        if differs:
            raise ValueError(f"{out_dir} holds a teacher cache with other {', '.join(differs)}; "
                             "use another directory or delete it")
        manifest = existing
        manifest["shards"] = [s for s in manifest["shards"] if _shard_intact(out_dir, s)]

    done = {s["start"] for s in manifest["shards"]}
    starts = list(range(0, num_sequences, sequences_per_shard))
    teacher_was_training = teacher.training
    teacher.eval()
    bar = _progress(num_sequences * seq_len, progress, initial=sum(s["end"] - s["start"] for s in manifest["shards"]) * seq_len)
    written = 0
    try:
        for index, start in enumerate(starts):
            if start in done:
                continue
            if stop_after_shards is not None and written >= stop_after_shards:
                break
            end = min(start + sequences_per_shard, num_sequences)
            ids_parts, value_parts = [], []
            with torch.no_grad():
                for b in range(start, end, batch_size):
                    batch = input_ids[b:min(b + batch_size, end)]
                    logits = _teacher_logits(teacher, batch.to(device=device, dtype=torch.long)).float()
                    if manifest["vocab_size"] is None:
                        manifest["vocab_size"] = logits.shape[-1]
                    elif logits.shape[-1] != manifest["vocab_size"]:
                        raise ValueError(f"the teacher returns {logits.shape[-1]} logits per token, the cache "
                                         f"records vocab_size {manifest['vocab_size']}")
                    if k > logits.shape[-1]:
                        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}")
                    values, ids = torch.log_softmax(logits / temperature, -1).topk(k, dim=-1)
                    ids_parts.append(ids.to("cpu", torch.int32))
                    value_parts.append(values.to("cpu", VALUE_DTYPES[values_dtype]))
                    bar.update(batch.numel())
            tensors = {"input_ids": input_ids[start:end].clone(), "topk_ids": torch.cat(ids_parts).contiguous(),
                       "topk_logprobs": torch.cat(value_parts).contiguous()}
            name = f"shard-{index:05d}.safetensors"
            # one metadata key: safetensors writes a map's keys in no fixed order, and a resumed
            # run must write the same bytes
            payload = safetensors_torch.save(tensors, metadata={"format": f"{FORMAT} {FORMAT_VERSION}"})
            _atomic_write_bytes(os.path.join(out_dir, name), payload)
            manifest["shards"].append(dict(file=name, start=start, end=end, bytes=len(payload),
                                           sha256=hashlib.sha256(payload).hexdigest()))
            manifest["shards"].sort(key=lambda s: s["start"])
            manifest["complete"] = len(manifest["shards"]) == len(starts)
            _write_manifest(out_dir, manifest)
            written += 1
    finally:
        bar.close()
        teacher.train(teacher_was_training)
    if len(manifest["shards"]) == len(starts) and not manifest["complete"]:
        manifest["complete"] = True
        _write_manifest(out_dir, manifest)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    tokens = sum(s["end"] - s["start"] for s in manifest["shards"]) * seq_len
    summary = CacheSummary(out_dir, num_sequences, tokens, total_bytes)
    if progress:
        print(f"teacher cache {out_dir}: {tokens} tokens, {total_bytes / 2**20:.1f} MiB, "
              f"{summary.bytes_per_token:.1f} bytes per token (k={k}, {values_dtype})", file=sys.stderr)
    return summary


def _shard_intact(directory: str, shard: dict) -> bool:
    path = os.path.join(directory, shard["file"])
    return os.path.exists(path) and os.path.getsize(path) == shard["bytes"] and _sha256_file(path) == shard["sha256"]


def _progress(total: int, enabled: bool, initial: int = 0):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, initial=initial, unit="tok", desc="teacher cache", file=sys.stderr)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """The cache as a map-style dataset: item ``i`` is sequence ``i``, read from its memory-mapped
    shard (nothing else is loaded):

        {"input_ids": [L] int64, "teacher_ids": [L, k] int32, "teacher_logprobs": [L, k] fp16/bf16}

    ``teacher_ids`` / ``teacher_logprobs`` go to :func:`kdkernels.sparse_kd_loss` as they are
    (``teacher_kind="logprobs"``, ``teacher_temperature=dataset.generation_temperature``);
    position t holds the teacher's distribution over the token after ``input_ids[t]``.

    Args:
        path: the cache directory.
        vocab_size: the student's vocabulary size; a cache of another size is refused.
        verify: ``"sha256"`` (default) checks each shard's hash against the manifest the first
            time it is opened (one streaming read of the shard); ``"size"`` checks the byte size
            only. Both refuse a truncated shard.
    """

    def __init__(self, path: str, *, vocab_size: Optional[int] = None, verify: str = "sha256") -> None:
        _, self._safe_open = _safetensors()
        if verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{path} is not a teacher cache (no {MANIFEST})")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported cache format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')!r} (this reader: {FORMAT} {FORMAT_VERSION})")
        if not manifest.get("complete"):
            raise ValueError(f"{path}: the cache is unfinished (a writer stopped); rerun the writer to resume it")
        if vocab_size is not None and manifest["vocab_size"] != vocab_size:
            raise ValueError(f"{path}: the cache's teacher has vocab_size {manifest['vocab_size']} but the student "
                             f"has {vocab_size}: a different tokenizer or vocabulary")
        self.path, self.manifest, self.verify = path, manifest, verify
        self.shards: List[dict] = manifest["shards"]
        for shard in self.shards:  # truncation is refused up front, for every shard
            self._check_size(shard)
        self._starts = [s["start"] for s in self.shards]
        self._open: Dict[int, Any] = {}

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def generation_temperature(self) -> float:
        return self.manifest["generation_temperature"]

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    def _check_size(self, shard: dict) -> None:
        file = os.path.join(self.path, shard["file"])
        if not os.path.exists(file):
            raise ValueError(f"{file}: shard missing from the teacher cache")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
            raise ValueError(f"{file}: shard is {size} bytes, the manifest says {shard['bytes']}: truncated or "
                             "corrupt; rebuild the cache")

    def _handle(self, index: int):
        handle = self._open.get(index)
        if handle is None:
            shard = self.shards[index]
            file = os.path.join(self.path, shard["file"])
            self._check_size(shard)
            if self.verify == "sha256" and _sha256_file(file) != shard["sha256"]:
                raise ValueError(f"{file}: shard contents do not match the manifest's sha256: corrupt; rebuild "
                                 "the cache")
            try:
                handle = self._safe_open(file, framework="pt")
            except Exception as error:
                raise ValueError(f"{file}: not a readable safetensors shard ({error})") from error
            self._open[index] = handle
        return handle

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} sequences")
        import bisect

        index = bisect.bisect_right(self._starts, i) - 1
        handle, row = self._handle(index), i - self.shards[index]["start"]
        return {"input_ids": handle.get_slice("input_ids")[row:row + 1][0].long(),
                "teacher_ids": handle.get_slice("topk_ids")[row:row + 1][0],
                "teacher_logprobs": handle.get_slice("topk_logprobs")[row:row + 1][0]}


# ---- command line ----------------------------------------------------------------------------------

def load_token_file(path: str, seq_len: int, tokenizer=None) -> torch.Tensor:
    """Token sequences [n, seq_len] from a file: ``.pt`` / ``.npy`` / ``.safetensors`` (key
    ``input_ids``) holding an integer tensor ``[n, L]`` or a 1-D token stream, or text (tokenised
    by `tokenizer`, else bytes). A stream is cut into whole sequences of ``seq_len``."""
    if path.endswith(".pt"):
        tokens = torch.load(path, weights_only=True)
    elif path.endswith(".npy"):
        import numpy

        tokens = torch.from_numpy(numpy.load(path, allow_pickle=False))
    elif path.endswith(".safetensors"):
        safetensors_torch, _ = _safetensors()
        tokens = safetensors_torch.load_file(path)["input_ids"]
    else:
        with open(path, "rb") as handle:
            raw = handle.read()
        if tokenizer is None:
            tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        else:
            text = raw.decode("utf-8", errors="replace")
            tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokens.dim() == 1:
        usable = tokens.numel() // seq_len * seq_len
        if usable == 0:
            raise ValueError(f"{path}: {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
        tokens = tokens[:usable].reshape(-1, seq_len)
    return tokens.long()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdkernels.teacher_cache",
                                     description="Run a teacher once over token data and cache its top-k log-probs.")
    parser.add_argument("--teacher", required=True, metavar="CKPT", help="local Hugging Face causal-LM checkpoint")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="tokens (.pt/.npy/.safetensors, [n, L] or 1-D) or text (tokenised by the checkpoint's "
                             "tokenizer when it has one, else bytes)")
    parser.add_argument("--out", required=True, metavar="DIR", help="cache directory (resumed if unfinished)")
    parser.add_argument("--k", type=int, default=64, help="ids per position (%(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="generation temperature (%(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length for 1-D data (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per teacher call (%(default)s)")
    parser.add_argument("--shard-size", type=int, default=256, help="sequences per shard (%(default)s)")
    parser.add_argument("--dtype", choices=tuple(VALUE_DTYPES), default="float16", help="log-prob dtype")
    parser.add_argument("--device", default="cpu", help="where the teacher runs (%(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True).to(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    input_ids = load_token_file(args.data, args.seq_len, tokenizer)
    build_teacher_cache(teacher, input_ids, args.out, k=args.k, temperature=args.temperature,
                        values_dtype=args.dtype, batch_size=args.batch_size, sequences_per_shard=args.shard_size,
                        vocab_size=teacher.config.vocab_size, device=args.device, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
