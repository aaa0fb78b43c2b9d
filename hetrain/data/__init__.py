"""Data loading: token-budget batching, packing, token files, long-sequence windows, the ring-buffer loader.

See hetrain/data/README.md for the pipeline, stage by stage.
"""

from hetrain.data.datamodule import RingDataModule, SyntheticDataModule, TokenDataModule
from hetrain.data.images import SyntheticImageDataModule, SyntheticImages
from hetrain.data.packing import PackedSequences, PackInto, pack_rows, segment_attention_mask
from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import CopyInto, LoaderError, PadInto, RingLoader, StreamBatches
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.splits import ignore_interrupts_in_workers
from hetrain.data.synthetic import PadWithIds, SyntheticSequences, pad_collate
from hetrain.data.tokenize import ByteTokenizer, build_token_file
from hetrain.data.tokens import TokenFile, TokenFileWriter, write_token_file
from hetrain.data.wait_clock import TimedDataLoader, WaitClock
from hetrain.data.windows import TokenWindows, Windows, make_windows, token_collate

__all__ = [
    "ByteTokenizer",
    "CopyInto",
    "DevicePrefetcher",
    "LoaderError",
    "PackInto",
    "PackedSequences",
    "PadInto",
    "PadWithIds",
    "RingDataModule",
    "RingLoader",
    "StreamBatches",
    "SyntheticDataModule",
    "SyntheticImageDataModule",
    "SyntheticImages",
    "SyntheticSequences",
    "TimedDataLoader",
    "TokenBudgetBatchSampler",
    "TokenFile",
    "TokenDataModule",
    "TokenFileWriter",
    "TokenWindows",
    "WaitClock",
    "Windows",
    "build_token_file",
    "ignore_interrupts_in_workers",
    "make_windows",
    "pack_rows",
    "pad_collate",
    "segment_attention_mask",
    "token_collate",
    "write_token_file",
]
