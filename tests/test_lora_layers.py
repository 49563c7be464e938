"""LoRA on nn.Embedding and nn.Conv1d / nn.Conv2d: agreement with peft (outputs and gradients), merge, export,
targeting rules and refusals."""

import copy
import json
import warnings

import pytest
import torch
from helpers import save_and_reload, tiny_gpt2, tiny_llama, tiny_vit, token_batch
from test_export import agree, logits, peft_load, randomize
from torch import nn

from lightning_peft import IA3, AdaLoRA, LoRA, PeftConfigError, apply_peft
from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.io.adapters import load_adapters, save_adapters
from lightning_peft.io.merged import merge_and_export
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from lightning_peft.methods.adalora import adalora_deltas

peft = pytest.importorskip("peft")
TOL = 1e-5


# -- tiny models ---------------------------------------------------------------------------------------------------
def tiny_convnext(seed: int = 0):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32,
                         patch_size=4, num_labels=3)
    return ConvNextForImageClassification(cfg).eval()


class Scaled(nn.Embedding):
    """A scaled word embedding (as Gemma's): peft multiplies the LoRA output by ``embed_scale`` too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = 2.5

    def forward(self, x):
        return super().forward(x) * self.embed_scale


class Conv3d(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv3d(2, 4, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.Flatten())


class Plain(nn.Module):
    """Embeddings (one with padding_idx, one scaled) and Conv1d layers (strided, grouped) in a plain module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.scaled = Scaled(20, 8)
        self.conv = nn.Conv1d(8, 6, kernel_size=3, stride=2, padding=1)
        self.grouped = nn.Conv1d(6, 6, kernel_size=3, padding=1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = (self.emb(x) + self.scaled(x)).transpose(1, 2)  # (batch, channels, length)
        return self.head(self.grouped(torch.relu(self.conv(h))).mean(-1))


def pixels(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ids(batch: int = 3, length: int = 7) -> torch.Tensor:
    x = torch.randint(0, 20, (batch, length), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0  # the padding index: its column of A gets no gradient, in peft and here
    return x


# -- agreement with peft -------------------------------------------------------------------------------------------
def _pair(model, targets, r=4, alpha=8, dropout=0.0):
    """(peft model, our model, our stack) with the same random A and B on ``targets``."""
    ours = copy.deepcopy(model)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                          init_lora_weights=False)
    ref = peft.get_peft_model(model, cfg)
    stack = apply_peft(ours, [LoRA(r=r, alpha=alpha, dropout=dropout, target_modules=targets)])
    assert sorted(stack.applied[0].targets) == sorted(ref.targeted_module_names)
    named = dict(ref.named_parameters())
    for name in stack.applied[0].targets:
        delta = ours.get_submodule(name).adapters["default"]["lora"]
        key = f"base_model.model.{name}"
        a, b = ((f"{key}.lora_embedding_A.default", f"{key}.lora_embedding_B.default")
                if isinstance(ours.get_submodule(name).base_layer, nn.Embedding)
                else (f"{key}.lora_A.default.weight", f"{key}.lora_B.default.weight"))
        with torch.no_grad():
            delta.lora_A.copy_(named[a])
            delta.lora_B.copy_(named[b])
    return ref, ours, stack


def _grads(model, stack_targets, embedding_names):
    out = {}
    named = dict(model.named_parameters())
    for n in stack_targets:
        if f"{n}.adapters.default.lora.lora_A" in named:  # ours
            out[n] = [named[f"{n}.adapters.default.lora.lora_{w}"].grad for w in "AB"]
        elif n in embedding_names:
            out[n] = [named[f"base_model.model.{n}.lora_embedding_{w}.default"].grad for w in "AB"]
        else:
            out[n] = [named[f"base_model.model.{n}.lora_{w}.default.weight"].grad for w in "AB"]
    return out


CASES = {
    "llama-embed_tokens": (lambda: tiny_llama(), ["embed_tokens", "q_proj"], lambda: {"input_ids": token_batch()}),
    "plain-embedding-conv1d": (Plain, ["emb", "scaled", "conv", "grouped"], lambda: {"x": ids()}),
    "vit-patch-conv2d": (tiny_vit, ["projection", "q_proj", "v_proj"], lambda: {"pixel_values": pixels()}),
    "convnext-depthwise": (tiny_convnext, ["patch_embeddings", "stages.0.layers.0.dwconv", "downsampling_layer.1"],
                           lambda: {"pixel_values": pixels(size=32)}),
    "conv3d": (Conv3d, ["0"], lambda: {"input": torch.randn(2, 2, 3, 6, 6, generator=torch.Generator().manual_seed(0))}),
}


def _out(model, batch):
    out = model(*batch.values()) if "input" in batch else model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case):
    build, targets, batch = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it cannot merge LoRA on a grouped conv
        ref, ours, stack = _pair(build(), targets, r=8 if case.startswith("convnext") else 4)
    x = batch()
    want, got = _out(ref, x), _out(ours, x)
    diff = (want - got).abs().max().item()
    (want.square().sum()).backward()
    (got.square().sum()).backward()
    emb = {n for n in stack.applied[0].targets if isinstance(ours.get_submodule(n).base_layer, nn.Embedding)}
    g_ref, g_ours = _grads(ref, stack.applied[0].targets, emb), _grads(ours, stack.applied[0].targets, emb)
    gdiff = max((a - b).abs().max().item() / max(a.abs().max().item(), 1.0)
                for n in g_ref for a, b in zip(g_ref[n], g_ours[n]))
    print(f"{case}: max |ours - peft| output {diff:.2e}, gradient (relative to max(|g|, 1)) {gdiff:.2e}")
    assert diff <= TOL and gdiff <= TOL
    with torch.no_grad(), stack.disable_adapters():
        assert (_out(ours, x) - got).abs().max() > 1e-3  # the adapters really change the output
    if case.startswith("plain"):  # the padding index's column of A gets no gradient
        assert torch.all(ours.emb.adapters["default"]["lora"].lora_A.grad[:, 0] == 0)



# -- merge ---------------------------------------------------------------------------------------------------------
def test_merge_unmerge_round_trip_embedding_and_convs():
    model = Plain()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["emb", "scaled", "conv"], init_weights=False)])
    x = ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            stack.merge()
            assert (model(x) - want).abs().max().item() <= TOL
            assert not torch.equal(model.conv.base_layer.weight, before["conv.base_layer.weight"])
            stack.unmerge()
            assert (model(x) - want).abs().max().item() <= TOL
    after = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    assert max((after[n] - before[n]).abs().max().item() for n in before) <= 1e-6


def test_grouped_conv_refuses_to_merge_and_leaves_the_model_unmerged(tmp_path):
    model = Plain()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["conv", "grouped"], init_weights=False)])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PeftConfigError, match=r"'grouped'.*grouped conv \(groups=2\)"):
        stack.merge()
    assert not stack.merged and all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    vit = tiny_convnext()
    apply_peft(vit, [LoRA(r=8, target_modules=["stages.0.layers.0.dwconv"])])
    with pytest.raises(PeftConfigError, match=r"merge_and_export: 'convnext.encoder.stages.0.layers.0.dwconv'"):
        merge_and_export(vit, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_tied_embedding_refuses_to_merge_but_exports(tmp_path):
    """GPT-2's word embedding is its LM head: folding LoRA into it would change the head too (peft's merge does)."""
    model, base_path = save_and_reload(tiny_gpt2(), tmp_path)
    stack = apply_peft(model, [LoRA(r=2, target_modules=["wte"], init_weights=False)])
    x = token_batch()
    ours = logits(model, x)
    with pytest.raises(PeftConfigError, match=r"'transformer.wte': its weight is tied to 'lm_head.weight'"):
        stack.merge()
    with pytest.raises(PeftConfigError, match=r"merge_and_export: 'transformer.wte': its weight is tied"):
        merge_and_export(model, tmp_path / "merged")
    assert not stack.merged and torch.equal(logits(model, x), ours)
    folder = save_adapters(model, tmp_path / "a")
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    agree((logits(theirs, x) - ours).abs().max().item(), TOL)


# -- export --------------------------------------------------------------------------------------------------------
def _peft_keys(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / PEFT_WEIGHTS_NAME))


def test_embedding_export_loads_in_peft(tmp_path):
    model, base_path = save_and_reload(tiny_llama(), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])])
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    keys = _peft_keys(folder)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    want = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    assert set(keys) == set(want)
    agree((logits(theirs, x) - ours).abs().max().item(), TOL)
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    assert torch.equal(logits(fresh, x), ours)


def test_conv_export_loads_in_peft_and_merges(tmp_path):
    model, base_path = save_and_reload(tiny_vit(), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=["projection", "q_proj", "v_proj"])],
                       unfreeze=["classifier"])
    randomize(stack)
    x = pixels()
    with torch.no_grad():
        ours = model(pixel_values=x).logits
    folder = save_adapters(model, tmp_path / "a")
    keys = _peft_keys(folder)
    conv = "base_model.model.vit.embeddings.patch_embeddings.projection"
    assert keys[f"{conv}.lora_A.weight"].shape == (4, 3, 4, 4) and keys[f"{conv}.lora_B.weight"].shape == (16, 4, 1, 1)
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    with torch.no_grad():
        agree((theirs(pixel_values=x).logits - ours).abs().max().item(), TOL)
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(pixel_values=x).logits, ours)
    merged = type(model).from_pretrained(merge_and_export(model, tmp_path / "merged")).eval()
    with torch.no_grad():
        agree((merged(pixel_values=x).logits - ours).abs().max().item(), TOL)
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, AdaptedLayer)  # left as it was


def test_grouped_conv_export_loads_in_peft(tmp_path):
    model, base_path = save_and_reload(tiny_convnext(), tmp_path)
    stack = apply_peft(model, [LoRA(r=8, target_modules=["stages.0.layers.0.dwconv", "patch_embeddings"])])
    randomize(stack)
    x = pixels(size=32)
    with torch.no_grad():
        ours = model(pixel_values=x).logits
    folder = save_adapters(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: merging a grouped conv is not supported
        theirs = peft.PeftModel.from_pretrained(type(model).from_pretrained(base_path).eval(), str(folder)).eval()
    with torch.no_grad():
        agree((theirs(pixel_values=x).logits - ours).abs().max().item(), TOL)


FOLDED = {
    "llama": (tiny_llama, ["embed_tokens", "v_proj"], ["q_proj"], lambda: {"input_ids": token_batch()},
              ("base_model.model.model.embed_tokens.lora_embedding_A", (5, 128))),
    "vit": (tiny_vit, ["projection", "v_proj"], ["q_proj"], lambda: {"pixel_values": pixels()},
            ("base_model.model.vit.embeddings.patch_embeddings.projection.lora_A.weight", (5, 3, 4, 4))),
}


@pytest.mark.parametrize("arch", list(FOLDED))
def test_folded_export_pads_embeddings_and_convs(tmp_path, arch):
    """LoRA on an embedding / a conv + AdaLoRA elsewhere: the folded path, with uniform_rank zero-padding."""
    build, lora_targets, adalora_targets, batch, (key, shape) = FOLDED[arch]
    model, base_path = save_and_reload(build(), tmp_path)
    stack = apply_peft(model, [LoRA(r=2, alpha=4, target_modules=lora_targets),
                               AdaLoRA(init_r=6, target_r=3, target_modules=adalora_targets)])
    randomize(stack)
    for delta in adalora_deltas(stack).values():
        delta.adalora_mask.copy_(torch.arange(6) < 5)  # rank 5 kept
    x = batch()
    with torch.no_grad():
        ours = _out(model, x)
    folder = save_adapters(model, tmp_path / "a", uniform_rank=True)
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == config["lora_alpha"] == 5 and config["rank_pattern"] == {}
    assert _peft_keys(folder)[key].shape == shape
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    with torch.no_grad():
        agree((_out(theirs, x) - ours).abs().max().item(), 1e-4)


def test_uniform_rank_pads_a_grouped_conv_per_group():
    from lightning_peft.io.lora_layout import pad_rank

    model = Plain()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["grouped"], init_weights=False)])
    layer, delta = model.grouped, model.grouped.adapters["default"]["lora"]
    h = torch.randn(2, 6, 5)
    A, B = pad_rank(delta.lora_A.detach(), delta.lora_B.detach(), 4, layer, "grouped")
    assert A.shape == (4, 6, 3) and B.shape == (6, 2, 1)
    padded = torch.nn.functional.conv1d(torch.nn.functional.conv1d(h, A, padding=1), B, groups=2) * delta.scaling
    assert (padded - delta(h)).abs().max().item() <= TOL
    with pytest.raises(PeftConfigError, match="groups=2, which needs a rank divisible by 2"):
        pad_rank(delta.lora_A.detach(), delta.lora_B.detach(), 3, layer, "grouped")
    assert stack.applied[0].targets == ["grouped"]


# -- targeting and refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_vit, tiny_convnext])
def test_all_linear_leaves_embeddings_and_convs_alone(build):
    model = build()
    stack = apply_peft(model, [LoRA(target_modules="all-linear")])
    kinds = {model.get_submodule(n).kind for n in stack.applied[0].targets}
    assert kinds == {"linear"}
    assert not any(isinstance(m, (nn.Embedding, nn.Conv2d)) for m in
                   (model.get_submodule(n).base_layer for n in stack.applied[0].targets))


def _untouched(model, strategies, match):
    before = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(PeftConfigError, match=match):
        apply_peft(model, strategies)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_linear_only_strategies_refuse_named_embeddings_and_convs():
    _untouched(tiny_llama(), [IA3(target_modules=["embed_tokens", "q_proj"], feedforward_modules=[])],
               r"matches 'model.embed_tokens' \(Embedding\), which IA3 cannot adapt: it adapts linear layers only")
    _untouched(tiny_vit(), [AdaLoRA(init_r=4, target_r=2, target_modules=r".*(projection|q_proj)")],
               r"'vit.embeddings.patch_embeddings.projection' \(Conv2d\), which AdaLoRA cannot adapt")
    # a LoRA that is fine is not applied either when a later strategy in the stack is refused
    _untouched(tiny_vit(), [LoRA(target_modules=["projection"]), IA3(target_modules=["projection"],
                                                                     feedforward_modules=[])], "IA3 cannot adapt")
    # exclude_modules drops them: then the strategy applies to the linears
    stack = apply_peft(tiny_llama(), [AdaLoRA(init_r=4, target_r=2, target_modules=r".*(embed_tokens|q_proj)",
                                              exclude_modules=["embed_tokens"])])
    assert all(n.endswith("q_proj") for n in stack.applied[0].targets)


def test_lora_refuses_convs_it_cannot_match():
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    _untouched(dilated, [LoRA(r=2, target_modules=["0"])], r"LoRA\(r=2\) cannot adapt '0' \(Conv2d\): its dilation")
    reflect = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"))
    _untouched(reflect, [LoRA(r=2, target_modules=["0"])], "padding_mode='reflect'")
    _untouched(tiny_convnext(), [LoRA(r=4, target_modules=["dwconv"])],
               r"'convnext.encoder.stages.0.layers.0.dwconv' \(Conv2d\): its groups=8 does not divide r=4")
    _untouched(nn.Sequential(nn.LayerNorm(4)), [LoRA(target_modules=["0"])], r"matched no linear layer of Sequential \(it matched "
               r"non-linear modules: 0\); .* \(nor any embedding/conv layer, which LoRA adapts when named\)")


def test_lora_variants_stay_on_linears():
    class MyLoRA(LoRA):  # a subclass (e.g. a variant) does not inherit the embedding / conv deltas
        pass

    _untouched(tiny_llama(), [MyLoRA(target_modules=["embed_tokens"])], "MyLoRA cannot adapt")
    _untouched(tiny_llama(), [LoRA(target_modules=["embed_tokens"], use_dora=True)],
               r"LoRA\(use_dora=True\) cannot adapt")
    _untouched(tiny_llama(), [LoRA(target_modules=["embed_tokens"], init_weights="olora")],
               r"LoRA\(init_weights='olora'\) cannot adapt")


# -- training: resume ------------------------------------------------------------------------------------------------
def test_resume_with_embedding_and_conv_lora_equals_uninterrupted(tmp_path):
    import lightning as L
    from helpers import loader, straight_and_resumed
    from torch.utils.data import TensorDataset

    from lightning_peft.callbacks import PEFT

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Plain()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (16, 7), generator=g), torch.randint(0, 3, (16,), generator=g))

    straight, resumed, _, t = straight_and_resumed(
        tmp_path, Module, lambda: [PEFT([LoRA(r=2, target_modules=["emb", "scaled", "conv", "grouped"])],
                                        unfreeze=["head"], model_attr="model")], loader(data))
    assert t.global_step == 4
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    assert any(".emb.adapters.default.lora.lora_A" in n for n in want)
    got = dict(resumed.named_parameters())
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    print(f"resume vs uninterrupted (embedding + conv LoRA): max |diff| = {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("case", ["embedding", "conv2d"])
def test_compiled_forward_has_no_graph_break(case):
    """Embedding and conv LoRA under torch.compile: no graph break (peft's LoRA has none here either)."""
    if case == "embedding":
        model, targets, kw = tiny_llama(), ["embed_tokens", "q_proj"], {"input_ids": token_batch()}
    else:
        model, targets, kw = tiny_vit(), ["patch_embeddings.projection", "q_proj"], {"pixel_values": pixels()}
    apply_peft(model, [LoRA(r=4, target_modules=targets)])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: model(**kw).logits.sum())()
    assert explained.graph_break_count == 0, explained.break_reasons
