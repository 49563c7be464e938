"""A tiny PEFT training run, launched by tests/test_ddp.py as ``python tests/ddp_train.py`` (not a test file).

With ``--devices 2`` it runs ``strategy="ddp"`` on the CPU (gloo); Lightning's launcher starts rank 1 by
re-running this script. With ``--devices 1`` it is the single-process reference with the same global batch.
Each rank writes what the test compares into ``--out``: its final adapter state and the AdaLoRA masks after
every reallocation (``rank<r>.pt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, classification_data, tiny_bert
from helpers import trainer as make_trainer

from lightning_peft import AdaLoRA, LoRA, PromptTuning, get_stack
from lightning_peft.callbacks import PEFT, RankBudgetScheduler

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def strategies(kind: str) -> list:
    lora = LoRA(r=4, alpha=8, target_modules=["query", "value"])
    if kind == "lora":
        return [lora]
    adalora = AdaLoRA(init_r=4, target_r=2, alpha=4.0, target_modules=["intermediate.dense", "output.dense"])
    return [PromptTuning(num_virtual_tokens=4), lora, adalora]


class MaskRecorder(L.Callback):
    """AdaLoRA masks after every optimizer step (runs after RankBudgetScheduler in the callback list)."""

    def __init__(self) -> None:
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.initial: dict[str, torch.Tensor] = {}
        self.batches: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.clone() for k, v in get_stack(pl_module, required=True).adapter_state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[1].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = get_stack(pl_module, required=True).adapter_state_dict()
        self.masks[trainer.global_step] = {
            k: v.clone() for k, v in state.items() if k.endswith("adalora_mask")
        }


class Data(L.LightningDataModule):
    """Rank r's batch i holds samples 8i+r, 8i+r+2, ... (DistributedSampler without shuffling), so the ranks'
    batches together are exactly the single-process batch i of the same global size."""

    def __init__(self, n: int, global_batch: int) -> None:
        super().__init__()
        self.n, self.global_batch = n, global_batch

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = classification_data(n=self.n)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=self.global_batch // world, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--stack", choices=["lora", "hybrid"], default="lora")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--strategy", default=None)
    args = parser.parse_args()

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.lightning.export_callback import AdapterExport

    torch.manual_seed(0)
    quantize = None
    if args.quantize != "none":
        from lightning_peft.quantization import Quantization

        quantize = Quantization(args.quantize)
    module = ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=1e-2)
    recorder = MaskRecorder()
    callbacks: list = [
        PEFT(strategies(args.stack), unfreeze=["classifier"], model_attr="model", quantize=quantize)
    ]
    if args.stack == "hybrid":
        callbacks.append(
            RankBudgetScheduler(tinit=1, tfinal=1, delta_t=1, total_step=args.steps, heatmap=False)
        )
    callbacks.append(recorder)
    callbacks += [
        ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=1),
        AdapterExport(dirpath=os.path.join(args.out, "export"), every_checkpoint=False, final=True),
    ]
    strategy = args.strategy or ("ddp" if args.devices > 1 else "auto")
    trainer = make_trainer(args.out, devices=args.devices, strategy=strategy, max_steps=args.steps,
                           enable_checkpointing=True, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data(args.steps * args.global_batch, args.global_batch))
    rank = trainer.global_rank
    stack = get_stack(module, required=True)
    torch.save(
        {
            "adapters": stack.adapter_state_dict(),
            "masks": recorder.masks,
            "initial": recorder.initial,
            "batches": recorder.batches,
            "world_size": trainer.world_size,
            "bnb_layers": sum(type(m).__name__ == "Linear4bit" for m in module.modules()),
            "find_unused": getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters"),
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
