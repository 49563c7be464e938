"""PEFTMixin: PEFT as part of the user's own LightningModule."""

import lightning as L
import torch
from helpers import classification_data, loader, tiny_bert, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PEFTMixin, Strategy


class MixinClassifier(PEFTMixin, L.LightningModule):
    def __init__(self, strategies: list[Strategy], lr: float = 2e-2, seed: int = 0) -> None:
        super().__init__(strategies=strategies, unfreeze=["classifier"], lr=lr)
        self.save_hyperparameters()
        self.model = tiny_bert(seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


def test_mixin_fit_checkpoint_and_load(tmp_path):
    module = MixinClassifier([LoRA(r=4, target_modules=["query", "value"])])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = trainer(tmp_path, max_steps=8, callbacks=[ckpt], enable_checkpointing=True)
    t.fit(module, loader(classification_data()))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert len(trainable) == 10 and {"model.classifier.weight", "model.classifier.bias"} <= trainable
    # the default optimizer holds exactly the trainable parameters
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}

    saved = torch.load(ckpt.last_model_path, weights_only=True)
    assert set(saved["state_dict"]) == trainable
    assert saved["lightning_peft"]["stack"]["strategies"][0]["name"] == "lora"

    loaded = MixinClassifier.load_from_checkpoint(ckpt.last_model_path)
    x = classification_data(n=4).tensors[0]
    module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))

    # configure_model runs again for validate: the stack is not applied twice
    stack = module.peft_stack
    t.validate(module, loader(classification_data(n=8)))
    assert module.peft_stack is stack
