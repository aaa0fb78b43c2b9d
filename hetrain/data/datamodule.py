"""LightningDataModules for text that feed the ring-buffer loader: synthetic sequences, and token files.

:class:`RingDataModule` is the shared part: a :class:`~hetrain.data.sampler.TokenBudgetBatchSampler`
laid out over Lightning's ranks, a :class:`~hetrain.data.ring.RingLoader` over it, a
:class:`~hetrain.data.prefetch.DevicePrefetcher` when the model's stages live on one GPU, and the
loader's fixed host bytes for the run summary.

:class:`TokenDataModule` classifies windows of long documents: each document carries a label, each
window of it (``max_len`` tokens, ``stride`` apart) is a sample with its document's label, gathered
from the token file by the ring's C++ threads (pread). Its corpus is a jsonl file (a text and a
label field), a directory of token files it wrote before, or, with no path, long synthetic documents
generated from the seed (see :func:`write_synthetic_corpus`). A corpus written into a shared ``data_dir``
is written once per node, in ``prepare_data``, and only read by every rank's ``setup``.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.splits import SeededSplits
from hetrain.data.synthetic import PadWithIds, SyntheticSequences, pad_collate
from hetrain.data.tokenize import ByteTokenizer, build_token_file, is_json_lines, iter_documents, jsonl_records
from hetrain.data.tokens import TokenFile, TokenFileWriter
from hetrain.data.windows import TokenWindows
from hetrain.placement.pipeline import stage_device

SPLITS = ("train", "val")
LABEL_TEXT = re.compile(r"-?[0-9]+")  # a label written as a JSON string: ASCII digits, not "²"
TOKEN_DIR_FILES = tuple(f"{split}{ext}" for split in SPLITS for ext in (".bin", ".idx", ".labels.npy"))
# The shortest run of a synthetic document whose label's markers are sure to be the majority: the recipe's windows
# are at least max_len - stride + 1 = 33 tokens; the markers added for 16 are ~5% of the tokens (signal 0.15).
MAJORITY_SPAN = 16


class LabelledRing(RingLoader):
    """A RingLoader over a :class:`TokenBudgetBatchSampler` whose batches carry ``labels`` (B,).

    With ``labels`` (one per sample: the C++ gather of token windows knows tokens only) a batch's labels are looked
    up by its ``sample_ids``; without, they are the ones the slot collate wrote. With ``unlabel_repeats``
    (validation), a batch that only repeats samples so that every rank runs as many batches (the sampler's
    ``repeated``) is labelled -100, which the task leaves out of ``val/loss`` and ``val/acc``, as
    :class:`~hetrain.data.splits.ValShares` does for torch's loader: else those samples counted twice there.
    """

    def __init__(self, source: Any, batch_sampler: TokenBudgetBatchSampler, labels: np.ndarray | None = None,
                 unlabel_repeats: bool = False, **kwargs: Any) -> None:
        super().__init__(source, batch_sampler, **kwargs)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.unlabel_repeats = unlabel_repeats

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # map, not a for loop: its target variable would keep the last batch (a ring slot) through next().
        # Job k of the ring is the sampler's batch k, and the ring reads the sampler's whole epoch before its first.
        yield from map(self._labelled, super().__iter__(), itertools.count())

    def _labelled(self, batch: dict[str, torch.Tensor], job: int) -> dict[str, torch.Tensor]:
        if self.labels is not None:
            batch["labels"] = self.labels[batch["sample_ids"]]
        if self.unlabel_repeats and self.batch_sampler.repeated[job]:
            batch["labels"] = torch.full_like(batch["labels"], -100)  # a new tensor: the slot stays as written
        return batch


def check_token_budget(max_tokens: int, max_len: int) -> None:
    """Refuses a token budget below the longest sample, naming the settings: the sampler sees numbers only."""
    if max_tokens < max_len:
        raise ValueError(f"hetrain: data.max_tokens={max_tokens} is smaller than data.max_len={max_len}: a batch "
                         f"must hold at least one whole sequence; set data.max_tokens>={max_len} or lower data.max_len")


class RingDataModule(pl.LightningDataModule):
    """Base for DataModules whose loaders are RingLoaders; subclasses build the loaders with :meth:`_ring`."""

    def __init__(self) -> None:
        super().__init__()
        self._loaders: dict[str, RingLoader] = {}
        self._summary: dict[str, Any] = {}

    def _layout(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of the Trainer this module is attached to; one rank without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _first_stage_device(self) -> torch.device | None:
        """Where the batch's inputs go: the device of the model's first stage, when all stages share it.

        Only then does a prefetch copy each batch tensor once; with stages on several devices the task's
        ``transfer_batch_to_device`` sends inputs and labels each straight to where they are used.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "stages"):
            return None
        # A stage without weights (an activation) runs where its input is: it names no device of its own.
        devices = {stage_device(stage) for stage in module.stages().values()} - {None}
        return devices.pop() if len(devices) == 1 else None

    def _ring(self, split: str, source: Any, lengths: Iterable[int], shuffle: bool, max_tokens: int,
              seed: int, **kwargs: Any) -> Iterable:
        """A :class:`LabelledRing` over ``source`` for ``split``, wrapped in a DevicePrefetcher when the stages are
        on a GPU. Validation's repeats (every rank runs as many batches) come unlabelled, counted once over the ranks.

        ``lookahead=0``: Lightning's loops fetch ahead only from loaders without a length, and a RingLoader has
        one, so every batch handed out has its step run by the time a checkpoint is saved.
        """
        old = self._loaders.pop(split, None)
        if old is not None:
            old.close()
        replicas, rank = self._layout()
        lengths = np.asarray(list(lengths))
        if split == "val" and not len(lengths):  # the sampler cannot say how to run without validation
            raise ValueError("hetrain: the val split holds no samples (data.val_size=0, or a corpus without any); "
                             "give it samples, or set trainer.limit_val_batches=0 to train without validation")
        sampler = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=shuffle, seed=seed,
                                          num_replicas=replicas, rank=rank)
        loader = LabelledRing(source, sampler, unlabel_repeats=split == "val", **kwargs)
        self._loaders[split] = loader
        device = self._first_stage_device()
        prefetch = device is not None and device.type == "cuda"
        self._summary[split] = {
            "loader": "ring", "ring_bytes": loader.nbytes, "pinned_bytes": loader.pinned_bytes,
            "padding_fraction": round(sampler.padding_fraction, 4),
            "prefetch": f"to {device} on a side stream" if prefetch else "off (the stages are not all on one GPU)",
        }
        return DevicePrefetcher(loader, device) if prefetch else loader

    def loader_summary(self) -> dict[str, Any]:
        """Per split: the loader kind, its host slot bytes (fixed at start), pinned bytes, padding, prefetch."""
        return dict(self._summary)

    def teardown(self, stage: str) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()


class SyntheticDataModule(SeededSplits, RingDataModule):
    """Train and validation splits of :class:`SyntheticSequences`, drawn from ``seed`` and ``seed + 1``.

    ``loader="ring"`` batches by token budget (``max_tokens`` padded tokens per batch) into the ring's
    slots with ``producers`` threads; ``loader="torch"`` is torch's DataLoader with ``batch_size``
    sequences per batch and ``num_workers`` processes, for comparison.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        num_classes: int = 4,
        min_len: int = 16,
        max_len: int = 64,
        markers_per_class: int = 8,
        signal: float = 0.15,
        distractors: float = 0.5,
        train_size: int = 8192,
        val_size: int = 1024,
        loader: str = "ring",
        max_tokens: int = 2048,
        num_slots: int = 4,
        producers: int = 2,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loader not in ("ring", "torch"):
            raise ValueError(f"hetrain: loader must be 'ring' or 'torch', got {loader!r}")
        if loader == "ring":  # torch's DataLoader batches by batch_size, not max_tokens
            check_token_budget(max_tokens, max_len)
        self.save_hyperparameters()

    def _split(self, size: int, seed: int) -> SyntheticSequences:
        h = self.hparams
        return SyntheticSequences(
            size, h.vocab_size, h.num_classes, h.min_len, h.max_len, h.markers_per_class, h.signal,
            h.distractors, seed,
        )

    def _loader(self, split: str, dataset: SyntheticSequences, shuffle: bool) -> Iterable:
        h = self.hparams
        if h.loader == "ring":
            rows = -(-h.max_tokens // h.min_len)  # the most sequences a batch can hold
            return self._ring(split, dataset, map(len, dataset.sequences), shuffle, h.max_tokens, h.seed,
                              collate=PadWithIds(h.max_tokens, rows), num_slots=h.num_slots,
                              num_workers=h.producers, pin_memory=self._pin())
        self._summary[split] = {"loader": "torch", "batch_size": h.batch_size}
        return self._torch_loader(dataset, shuffle, collate_fn=pad_collate)

    def train_dataloader(self) -> Iterable:
        return self._loader("train", self.train_set, shuffle=True)

    def val_dataloader(self) -> Iterable:
        return self._loader("val", self.val_set, shuffle=False)


def write_synthetic_corpus(out_dir: str | os.PathLike, num_docs: dict[str, int], seed: int,
                           min_span: int = MAJORITY_SPAN, **kwargs: Any) -> None:
    """Writes ``<out_dir>/<split>.bin/.idx`` and ``<split>.labels.npy``: long documents with a learnable label.

    The documents are :class:`~hetrain.data.synthetic.SyntheticSequences` (class markers among noise, the
    label the majority class) at document length, with ``min_span``: every run of at least ``min_span``
    (default 16) consecutive tokens of a document, so every window of that many tokens or more, holds more
    markers of its label than of any other class, as does every whole document. A shorter window that is not a
    whole document may not: only a document's last window can be shorter, where ``stride > max_len - min_span +
    1`` (every window, where ``max_len < min_span``). Split ``k`` is drawn from ``seed + k``; the same seed, the
    same files. Tokens are uint16 up to ``vocab_size`` 65536, uint32 past it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, size) in enumerate(num_docs.items()):
        docs = SyntheticSequences(size, seed=seed + k, min_span=min_span, **kwargs)
        with TokenFileWriter(out / split, itemsize=2 if docs.vocab_size <= 1 << 16 else 4) as writer:
            for seq in docs.sequences:
                writer.add(seq.numpy())
        save_labels(out / f"{split}.labels.npy", docs.labels.numpy())


def save_labels(path: Path, labels: np.ndarray) -> None:
    """``numpy.save``, renamed into place: a reader, or a node writing the same shared file, never sees half of it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, labels)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_labels(path: Path, num_docs: int) -> np.ndarray:
    """``path`` (a ``<split>.labels.npy``) as int64, refused unless it is a 1-D integer array of ``num_docs``.

    Float labels (pandas writes them once a column has a gap) were truncated to int64 without a word.
    """
    how = (f"write one integer class per document: numpy.save('{path}', "
           "numpy.asarray(labels, dtype=numpy.int64).reshape(-1))")
    try:
        labels = np.load(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"hetrain: {path} is not a numpy array numpy.load reads without pickle ({exc}); {how}") \
            from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"hetrain: {path} holds a {labels.dtype} array of shape {labels.shape}, not a 1-D integer "
                         f"array of labels; {how}")
    if len(labels) != num_docs:
        raise ValueError(f"hetrain: {path} holds {len(labels)} labels for {num_docs} documents")
    return labels


def read_labels(path: str | os.PathLike, label_field: str) -> list[int]:
    """The integer ``label_field`` of every non-blank line of a jsonl file; a line without one is named."""
    labels = []
    for number, record, _ in jsonl_records(path):  # the lines the documents are read from (iter_documents)
        if not isinstance(record, dict):
            raise ValueError(f"hetrain: {path}:{number} is a JSON {type(record).__name__}, not a record with a label")
        labels.append(_label(record.get(label_field), f"{path}:{number}", label_field))
    return labels


def _label(value: object, where: str, label_field: str) -> int:
    """``value`` as a label: a JSON integer or a string of ASCII digits, in ``[0, 2**63)``.

    ``str.isdigit`` let "²" and "--1" through to fail in ``int()`` naming no line; 10**20 overflowed in numpy.
    """
    if isinstance(value, str) and LABEL_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"hetrain: {where}: field {label_field!r} is {value!r}, not an integer label; every line "
                         "needs one (set data.label_field to the field that holds it)")
    if value < 0:
        raise ValueError(f"hetrain: {where}: label {value} is negative; labels are classes counted from 0, so must "
                         "be >= 0: fix the label")
    if value >= 1 << 63:
        raise ValueError(f"hetrain: {where}: label {value} is past int64 (2**63 - 1); labels are classes counted "
                         "from 0, below data.num_classes: fix the label")
    return value


def check_val_fraction(val_fraction: float) -> None:
    """Refuses a share outside (0, 1): 0 still held one document out, 1.5 and -0.2 made lopsided splits."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise ValueError(f"hetrain: data.val_fraction={val_fraction!r} is the share of jsonl documents held out for "
                         "validation and must lie in (0, 1), e.g. 0.1; to train without validation keep it and set "
                         "trainer.limit_val_batches=0")


def write_jsonl_corpus(path: str | os.PathLike, out_dir: str | os.PathLike, text_field: str, label_field: str,
                       val_fraction: float, seed: int) -> None:
    """Tokenises a jsonl corpus (byte tokenizer) into train and val token files, documents split from ``seed``."""
    texts = list(iter_documents([path], text_field))
    labels = np.asarray(read_labels(path, label_field), dtype=np.int64)
    if len(texts) < 2:
        raise ValueError(f"hetrain: {path} holds {len(texts)} documents; a train and a val split need at least 2")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    out = Path(out_dir)
    for split, picked in (("val", order[:n_val]), ("train", order[n_val:])):
        picked = np.sort(picked)
        build_token_file((texts[i] for i in picked), out / split, ByteTokenizer())
        save_labels(out / f"{split}.labels.npy", labels[picked])


def missing_token_files(corpus: Path) -> list[str]:
    """The files :class:`TokenDataModule` reads that ``corpus`` lacks."""
    return [name for name in TOKEN_DIR_FILES if not (corpus / name).is_file()]


def check_token_dir(corpus: Path) -> Path:
    """``corpus`` if it holds every file :class:`TokenDataModule` reads; else an error saying how to make them.

    ``python -m hetrain.data.build_tokens`` writes one unlabelled ``<out>.bin``/``.idx``: not enough here.
    """
    missing = missing_token_files(corpus)
    if missing:
        found = sorted(p.name for p in corpus.iterdir() if p.suffix in (".bin", ".idx", ".npy"))
        raise FileNotFoundError(
            f"hetrain: data.path {corpus} is missing {', '.join(missing)} (token files there: "
            f"{', '.join(found) or 'none'}). It needs train and val token files, each with <split>.labels.npy "
            "(one integer label per document). Write all of them from a labelled jsonl: data.path=<corpus.jsonl> "
            f"data.vocab_size={ByteTokenizer.vocab_size} data.data_dir={corpus}, then data.path={corpus} reuses "
            f"them; or build each split (python -m hetrain.data.build_tokens <files> --out {corpus}/train, then "
            f"--out {corpus}/val) and save its labels with numpy.save('{corpus}/<split>.labels.npy', labels)")
    return corpus


class TokenDataModule(RingDataModule):
    """Windows of long labelled documents, streamed from token files through the ring's C++ gather.

    Args:
        path: a ``.jsonl`` file (``text_field``, integer ``label_field``; byte-tokenised), a directory holding
            ``train``/``val`` token files and ``<split>.labels.npy`` (what this module writes), or None:
            synthetic long documents (``train_size``/``val_size`` of them, ``min_doc_len``..``max_doc_len``).
        data_dir: where token files are written, by :meth:`prepare_data` (once per node) for every rank to read;
            None: each process writes its own temporary directory in :meth:`setup`.
        max_len, stride: window length and step; windows of a document overlap by ``max_len - stride``.
        val_fraction: jsonl: the share of documents held out for validation, in (0, 1).
        max_tokens: padded tokens per batch (token-budget batching).
        vocab_size, num_classes: of the data; token ids are checked against ``vocab_size`` as they are gathered.
        num_slots, producers: ring slots and C++ gather threads.
    """

    def __init__(
        self,
        path: str | None = None,
        data_dir: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        val_fraction: float = 0.1,
        max_len: int = 128,
        stride: int = 96,
        max_tokens: int = 4096,
        vocab_size: int = 256,
        num_classes: int = 4,
        train_size: int = 1024,
        val_size: int = 128,
        min_doc_len: int = 64,
        max_doc_len: int = 1024,
        markers_per_class: int = 8,
        signal: float = 0.15,
        distractors: float = 0.5,
        seed: int = 0,
        num_slots: int = 4,
        producers: int = 2,
    ) -> None:
        super().__init__()
        check_val_fraction(val_fraction)
        check_token_budget(max_tokens, max_len)
        self.save_hyperparameters()
        self.windows: dict[str, TokenWindows] = {}
        self.labels: dict[str, np.ndarray] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._prepared = False

    def _corpus_is_token_dir(self) -> bool:
        """Whether ``path`` is token files already (read as they are), not a corpus to write as token files."""
        path = self.hparams.path
        if path is None or is_json_lines(path):
            return False
        if Path(path).is_dir():
            return True
        raise ValueError(f"hetrain: data path {path!r} is neither a JSON Lines file (.jsonl or .json) nor a "
                         "directory of token files; set data.path to one of them, or to null for synthetic documents")

    def _write_corpus(self, out: Path) -> None:
        """Writes the jsonl or synthetic corpus as the split token files and labels :meth:`setup` reads."""
        h = self.hparams
        if h.path is None:
            write_synthetic_corpus(
                out, {"train": h.train_size, "val": h.val_size}, h.seed, vocab_size=h.vocab_size,
                num_classes=h.num_classes, min_len=h.min_doc_len, max_len=h.max_doc_len,
                markers_per_class=h.markers_per_class, signal=h.signal, distractors=h.distractors,
            )
        else:
            write_jsonl_corpus(h.path, out, h.text_field, h.label_field, h.val_fraction, h.seed)

    def prepare_data(self) -> None:
        """Writes the token files into ``data_dir`` before any rank's :meth:`setup` reads them.

        Lightning calls this on each node's local rank 0 alone and holds the other ranks at a barrier until it
        returns: ranks writing the shared directory at once in ``setup`` broke each other's renames.
        """
        if self.hparams.data_dir is None or self._corpus_is_token_dir() or self.windows:
            return
        self._write_corpus(Path(self.hparams.data_dir))
        self._prepared = True

    def _prepared_dir(self, corpus: Path) -> Path:
        """``corpus`` (the ``data_dir``) once :meth:`prepare_data` filled it; else an error saying how to fill it."""
        missing = missing_token_files(corpus)
        if missing:
            raise FileNotFoundError(
                f"hetrain: data.data_dir {corpus} is missing {', '.join(missing)}. TokenDataModule writes them in "
                "prepare_data(), which a Trainer runs on each node's local rank 0 before setup(); when calling "
                "setup() yourself on several processes, call prepare_data() on one of them first, and with "
                "prepare_data_per_node=False give every node the same (shared) data_dir")
        return corpus

    def _corpus_dir(self) -> Path:
        """The directory holding the split token files: ``path``, a per-process temporary one, or ``data_dir``."""
        h = self.hparams
        if self._corpus_is_token_dir():
            return check_token_dir(Path(h.path))
        if h.data_dir is None:  # a corpus of this process alone: no other rank writes or reads it
            self._tmp = tempfile.TemporaryDirectory(prefix="hetrain-tokens-")
            self._write_corpus(Path(self._tmp.name))
            return Path(self._tmp.name)
        if not self._prepared and self._layout()[0] == 1:
            self.prepare_data()  # one process, set up without a Trainer: nothing to race with
        return self._prepared_dir(Path(h.data_dir))

    def setup(self, stage: str | None = None) -> None:
        if self.windows:
            return
        corpus = self._corpus_dir()
        windows, labels = {}, {}  # kept only once every split is read: a setup failing on val can be run again
        for split in SPLITS:
            tf = TokenFile(corpus / split)
            self._check_vocab(tf)
            doc_labels = self._doc_labels(corpus / f"{split}.labels.npy", tf)
            windows[split] = TokenWindows(tf, self.hparams.max_len, self.hparams.stride)
            labels[split] = doc_labels[windows[split].windows.doc]  # a window's label is its document's
        self.windows, self.labels = windows, labels

    def _doc_labels(self, path: Path, tf: TokenFile) -> np.ndarray:
        """``path``'s labels, one per document of ``tf``, each in ``[0, data.num_classes)``."""
        if not path.is_file():
            raise FileNotFoundError(f"hetrain: {path} is missing: one label per document of {tf}")
        labels = load_labels(path, len(tf))
        if len(labels) and labels.min() < 0:
            i = int(labels.argmin())
            raise ValueError(f"hetrain: {path} holds label {labels[i]} (document {i}); labels are classes counted "
                             "from 0, so must be >= 0: fix the labels")
        num_classes = self.hparams.num_classes
        if len(labels) and labels.max() >= num_classes:
            source = self.hparams.path if self.hparams.path is not None else path
            raise ValueError(
                f"hetrain: the labels of {source} run from {labels.min()} to {labels.max()}, outside "
                f"[0, data.num_classes={num_classes}); set data.num_classes={int(labels.max()) + 1} "
                "(labels count from 0), or fix the labels")
        return labels.astype(np.int64)

    def _check_vocab(self, tf: TokenFile) -> None:
        """Refuses a jsonl corpus whose byte tokens reach past ``vocab_size`` here, naming the settings.

        Later, the gather names only the written token file: a temporary one, deleted by the time it is read.
        """
        h = self.hparams
        if h.path is None or self._corpus_is_token_dir() or not len(tf.tokens):
            return
        largest = int(tf.tokens.max())
        if largest >= h.vocab_size:
            raise ValueError(
                f"hetrain: data.path {h.path} tokenises (byte tokenizer) to token ids up to {largest}, past "
                f"data.vocab_size={h.vocab_size}; set data.vocab_size={ByteTokenizer.vocab_size}, the byte "
                "tokenizer's vocabulary")

    def _loader(self, split: str, shuffle: bool) -> Iterable:
        h = self.hparams
        windows = self.windows[split]
        return self._ring(split, windows, windows.lengths, shuffle, h.max_tokens, h.seed, labels=self.labels[split],
                          num_slots=h.num_slots, num_workers=h.producers, vocab_size=h.vocab_size)

    def train_dataloader(self) -> Iterable:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Iterable:
        return self._loader("val", shuffle=False)

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if stage == "fit" and self._tmp is not None:
            self.windows.clear()
            self._tmp.cleanup()
            self._tmp = None
