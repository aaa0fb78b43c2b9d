"""RandomState under Lightning's DDP with 2 CPU processes (gloo): each rank resumes its own generators."""

import json

import torch
from test_ddp import run_two_ranks

DRAWS_PER_RANK = '''
import json, random, sys
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from hetrain.callbacks import RandomState


class Drawing(pl.LightningModule):
    """Draws 1 + rank values from each generator per step (as dropout draws per its rank's batch shape)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.draws = {}

    def training_step(self, batch, batch_idx):
        n = 1 + self.global_rank
        self.draws[self.global_step] = [torch.rand(n).tolist(), np.random.rand(n).tolist(),
                                        [random.random() for _ in range(n)]]
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        with open(f"{sys.argv[1]}/{sys.argv[2]}_rank{self.global_rank}.json", "w") as f:
            json.dump(self.draws, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    out, mode = sys.argv[1], sys.argv[2]
    # 8 samples, batch 1, 2 ranks: an epoch is 4 steps, and the checkpoint at step 4 ends one (a DataLoader cannot
    # resume mid-epoch).
    saver = ModelCheckpoint(f"{out}/ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         callbacks=[RandomState(), saver] if mode == "full" else [RandomState()])
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1)
    trainer.fit(Drawing(), data, ckpt_path=f"{out}/ckpt/step=4.ckpt" if mode == "resumed" else None)
'''


def test_a_resumed_ddp_run_draws_on_each_rank_what_the_uninterrupted_one_drew(tmp_path):
    run_two_ranks(DRAWS_PER_RANK, tmp_path, "full")
    run_two_ranks(DRAWS_PER_RANK, tmp_path, "resumed")
    for rank in range(2):
        full = json.loads((tmp_path / f"full_rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed_rank{rank}.json").read_text())
        assert sorted(resumed, key=int) == ["4", "5", "6", "7"]
        assert resumed == {step: draws for step, draws in full.items() if int(step) >= 4}, f"rank {rank}"
    # The file holds both ranks' states, each readable by Lightning's weights_only load.
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)["callbacks"]["RandomState"]
    assert len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["torch"], state["ranks"][1]["torch"])  # they had parted ways
