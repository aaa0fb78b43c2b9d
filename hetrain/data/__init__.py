"""Datasets and LightningDataModules; for now the synthetic token task that needs no download."""

from hetrain.data.synthetic import SyntheticDataModule, SyntheticSequences, pad_collate

__all__ = ["SyntheticDataModule", "SyntheticSequences", "pad_collate"]
