"""``CausalLM``: any ``AutoModelForCausalLM`` with a PEFT stack; loss and perplexity."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_peft.cli.tasks.base import TaskModule
from lightning_peft.methods.base import Strategy
from lightning_peft.quantization import Quantization


class CausalLM(TaskModule):
    """Causal language modeling (instruction tuning when the data module gives prompt/response pairs).

    Logs ``train_loss``; ``val_loss`` and ``val_ppl`` (``exp`` of the token-weighted mean loss) each validation
    epoch; the same with ``test_`` in ``test``. ``predict`` generates up to ``max_new_tokens`` after each prompt
    and returns the decoded continuations.

    Args:
        model_name_or_path: a Hugging Face causal LM path or hub name (e.g. a Llama-family model).
        strategies: the PEFT strategies, applied in order (default ``[LoRA()]`` on all linears).
        quantization: quantize the frozen backbone with bitsandbytes (QLoRA: ``{mode: nf4, double_quant: true}``).
        unfreeze: modules trained fully (default none).
        optimizer: optimizer over the trainable parameters (default AdamW with ``lr`` and ``weight_decay``).
        scheduler: learning-rate scheduler on that optimizer.
        scheduler_interval: step the scheduler every ``"step"`` or every ``"epoch"``.
        lr: learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW.
        gradient_checkpointing: recompute activations in backward to save memory.
        torch_dtype: load the backbone in this dtype (default: the checkpoint's).
        adapter_name: name of the adapter set.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): train the B-type factors (LoRA's ``lora_B``, ...) at this
            many times the optimizer's learning rate (16 is the paper's starting point); ``None``: off.
        max_new_tokens: tokens generated per prompt in ``predict``.

    Example:
        >>> model = CausalLM("path/to/llama", strategies=[LoRA(r=16, target_modules="all-linear")],
        ...                  quantization=Quantization("nf4", double_quant=True))
    """

    data_task = "causal_lm"

    def __init__(
        self,
        model_name_or_path: str,
        strategies: list[Strategy] | None = None,
        quantization: Quantization | None = None,
        unfreeze: list[str] | str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        adapter_name: str = "default",
        max_new_tokens: int = 32,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__(
            model_name_or_path,
            strategies,
            quantization,
            unfreeze,
            optimizer,
            scheduler,
            scheduler_interval,
            lr,
            weight_decay,
            gradient_checkpointing,
            torch_dtype,
            adapter_name,
            loraplus_lr_ratio,
        )
        self.max_new_tokens = max_new_tokens
        self._sums: dict[str, list[float]] = {}
        self._tokenizer: Any = None

    def load_model(self, path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    #: label positions the loss skips at the start (a causal LM predicts every label but the first)
    label_shift = 1

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        loss = self(**batch).loss
        tokens = int((batch["labels"][:, self.label_shift :] != -100).sum())
        sums = self._sums.setdefault(prefix, [0.0, 0])
        sums[0] += float(loss.detach()) * tokens
        sums[1] += tokens
        self.log(
            f"{prefix}_loss", loss, prog_bar=prefix == "val", batch_size=int(batch["input_ids"].shape[0])
        )
        return loss

    def _log_perplexity(self, prefix: str) -> None:
        total, tokens = self._sums.pop(prefix, [0.0, 0])
        if tokens:
            # token-weighted over the epoch (per-device: with DDP, ranks report their own shard's value)
            self.log(f"{prefix}_ppl", math.exp(min(total / tokens, 50.0)), prog_bar=prefix == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        if self._tokenizer is None:
            from lightning_peft.cli.data.encoding import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name_or_path)
        tok = self._tokenizer
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        if not self.model.config.is_encoder_decoder:  # a decoder returns the prompt too
            out = out[:, batch["input_ids"].shape[1] :]
        return tok.batch_decode(out, skip_special_tokens=True)

    def prediction_rows(self, output: list[str]) -> list[dict[str, Any]]:
        """One row per prompt, for :class:`~lightning_peft.callbacks.PredictionWriter`: ``generated``."""
        return [{"generated": text} for text in output]


class Seq2SeqLM(CausalLM):
    """Sequence-to-sequence generation (T5, BART, ...): the prompt column is the encoder input, the response
    the target. Same arguments, metrics (``val_loss``, ``val_ppl``) and ``predict`` as :class:`CausalLM`.

    Example:
        >>> model = Seq2SeqLM("google/flan-t5-small", strategies=[LoRA(r=8, target_modules=["q", "v"])])
    """

    data_task = "seq2seq"
    label_shift = 0  # every target token is predicted

    def load_model(self, path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)


__all__ = ["CausalLM", "Seq2SeqLM"]
