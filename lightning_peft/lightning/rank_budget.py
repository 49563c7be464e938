"""``RankBudgetScheduler``: AdaLoRA's budget schedule and rank reallocation for an ordinary Trainer."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.adalora.allocator import RankAllocator, check_schedule
from lightning_peft.methods.adalora.method import adalora_parts, find_adalora_stack, orthogonal_regularization
from lightning_peft.methods.adalora.regularizer import ORTH_REG_ADDED
from lightning_peft.viz.heatmap import HEATMAP_FILE, plot_rank_heatmap

PATTERN_FILE = "adalora_rank_pattern.json"


class RankBudgetScheduler(Callback):
    """Prunes AdaLoRA triplets on a cubic global budget while the Trainer runs (AdaLoRA paper, Section 3).

    The budget is the full ``init_r`` per matrix for ``tinit`` optimizer steps, shrinks cubically to
    ``target_r`` per matrix by step ``T - tfinal``, and stays there; every ``delta_t`` optimizer steps the
    best triplets under the budget are kept across all adapted matrices. ``T`` is ``total_step`` or, by
    default, ``trainer.estimated_stepping_batches``. All counts are optimizer steps: with
    ``accumulate_grad_batches=k`` the allocator runs once every ``k`` batches.

    The allocator reads the gradients in ``on_train_batch_end`` of the batches on which the optimizer
    stepped: in Lightning's automatic optimization ``zero_grad`` runs in the next step's closure, so the
    gradients of the step are still there, and the weights are already updated, which is the order of PEFT's
    ``backward, optimizer.step, update_and_allocate, zero_grad``.

    It logs ``adalora/budget`` and ``adalora/mean_rank`` (and ``adalora/orth_reg``) through the Trainer's
    logger, and at the end of training draws a heatmap of the kept rank (layers x adapted matrices) into
    ``<trainer.log_dir>/adalora_rank_heatmap.png``, with the final rank pattern in
    ``adalora_rank_pattern.json``; loggers that take images (TensorBoard ``add_figure``, or any logger with
    ``log_image`` such as W&B) get the figure too. The allocator's state (score averages, step, final mask) is
    saved in checkpoints, and the masks are adapter buffers, so a resumed run continues exactly.

    Orthogonal regularization: with ``add_orth_reg=True`` (default) the callback wraps the LightningModule's
    ``training_step`` for the duration of ``fit`` and adds
    :func:`~lightning_peft.methods.adalora.method.orthogonal_regularization` (weighted by the strategy's
    ``orth_reg_weight``) to the loss it returns (a tensor, or the ``"loss"`` entry of a dict), before
    Lightning scales it for gradient accumulation. Set ``add_orth_reg=False`` if your ``training_step`` adds
    the term itself, and with manual optimization (the returned loss is not used there).

    Args:
        tinit: optimizer steps of warm-up at the full budget.
        tfinal: final optimizer steps with the allocation fixed.
        delta_t: reallocate every ``delta_t`` optimizer steps.
        total_step: total optimizer steps T; ``None`` uses ``trainer.estimated_stepping_batches``.
        add_orth_reg: add the orthogonal regularizer to the training loss (see above).
        heatmap: draw the rank heatmap PNG at the end of training (needs matplotlib).
        heatmap_every_n_steps: also draw ``adalora_rank_heatmap_step<N>.png`` every N optimizer steps.

    Example:
        >>> trainer = L.Trainer(callbacks=[
        ...     PEFT([AdaLoRA(init_r=12, target_r=4, target_modules=["query", "value"])], unfreeze=["classifier"]),
        ...     RankBudgetScheduler(tinit=100, tfinal=300, delta_t=10)])
    """

    def __init__(
        self,
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        total_step: int | None = None,
        add_orth_reg: bool = True,
        heatmap: bool = True,
        heatmap_every_n_steps: int | None = None,
    ) -> None:
        check_schedule(tinit, tfinal, delta_t, total_step if total_step is not None else tinit + tfinal + 1)
        if heatmap_every_n_steps is not None and (
            not isinstance(heatmap_every_n_steps, int) or heatmap_every_n_steps <= 0
        ):
            raise PeftConfigError(
                f"heatmap_every_n_steps={heatmap_every_n_steps!r} is not valid; expected an "
                "integer > 0 or None"
            )
        self.tinit, self.tfinal, self.delta_t, self.total_step = tinit, tfinal, delta_t, total_step
        self.add_orth_reg = add_orth_reg
        self.heatmap = heatmap
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.allocator: RankAllocator | None = None
        self.heatmap_path: str | None = None
        self._pending_state: dict[str, Any] | None = None
        self._seen_step = 0
        self._stack: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stack = find_adalora_stack(pl_module)
        if stack is None:
            raise PeftConfigError(
                f"RankBudgetScheduler found no AdaLoRA strategy on {type(pl_module).__name__}; add "
                "AdaLoRA(init_r=..., target_r=...) to the strategies of the PEFT callback (or of apply_peft / "
                "PEFTMixin), or remove RankBudgetScheduler from the Trainer's callbacks"
            )
        self._stack = stack
        if not pl_module.automatic_optimization:
            warnings.warn(
                "RankBudgetScheduler with manual optimization: it reads gradients in on_train_batch_end, so do "
                "not call zero_grad after optimizer.step in training_step, and add "
                "orthogonal_regularization(self) to your loss yourself",
                UserWarning,
                stacklevel=2,
            )
        elif self.add_orth_reg and adalora_parts(stack)[0].orth_reg_weight > 0:
            self._wrap_training_step(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # T is read here, not in on_fit_start: estimated_stepping_batches builds the train dataloader, which
        # must happen after Lightning restored a resumable loader's position from the checkpoint.
        total, source = self.total_step, "total_step"
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise PeftConfigError(
                    "RankBudgetScheduler(total_step=None) cannot infer T: trainer.estimated_stepping_batches is "
                    "infinite; set the Trainer's max_steps or max_epochs, or pass total_step="
                )
            total, source = int(estimated), "T (trainer.estimated_stepping_batches)"
        check_schedule(self.tinit, self.tfinal, self.delta_t, total, total_from=source)
        self.allocator = RankAllocator.from_model(
            self._stack, tinit=self.tinit, tfinal=self.tfinal, delta_t=self.delta_t, total_step=total
        )
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)
            self._pending_state = None
        self._seen_step = trainer.global_step  # after the loops are restored from a checkpoint

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.allocator is None or step == self._seen_step:  # accumulating: no optimizer step on this batch
            return
        self._seen_step = step
        self.allocator.step(step)
        pl_module.log(
            "adalora/budget", float(self.allocator.budget), on_step=True, on_epoch=False, batch_size=1
        )
        pl_module.log(
            "adalora/mean_rank", self.allocator.mean_rank(), on_step=True, on_epoch=False, batch_size=1
        )
        if self.heatmap_every_n_steps and step % self.heatmap_every_n_steps == 0:
            self._draw(trainer, f"adalora_rank_heatmap_step{step}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.allocator is None:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank calls it
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            pattern = {
                "step": self.allocator.last_step,
                "budget": self.allocator.budget,
                "rank": self.allocator.rank_pattern(),
                "final_mask": self.allocator.final_rank_pattern(),
            }
            with open(os.path.join(log_dir, PATTERN_FILE), "w") as f:
                json.dump(pattern, f, indent=1)
        if self.heatmap:
            self._draw(trainer, HEATMAP_FILE, log_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap_training_step(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unwrap_training_step(pl_module)
        if stage == "fit" and self.allocator is not None:
            for d in self.allocator.deltas.values():
                d._flag.attached = False

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.allocator is not None:
            return {"allocator": self.allocator.state_dict()}
        return {"allocator": self._pending_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("allocator")
        if state is None:
            return
        if self.allocator is not None:
            self.allocator.load_state_dict(state)
        else:  # callbacks are restored before on_fit_start builds the allocator
            self._pending_state = state

    # -- orthogonal regularization ---------------------------------------------------------------------------
    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        if pl_module.__dict__.get(ORTH_REG_ADDED):
            return
        original = pl_module.training_step
        stack = self._stack

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return add_to_loss(original(*args, **kwargs), pl_module, stack)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        pl_module.__dict__[ORTH_REG_ADDED] = True

    def _unwrap_training_step(self, pl_module: L.LightningModule) -> None:
        if pl_module.__dict__.pop(ORTH_REG_ADDED, False):
            pl_module.__dict__.pop("training_step", None)

    # -- heatmap ---------------------------------------------------------------------------------------------
    def _draw(self, trainer: L.Trainer, filename: str, log_dir: str | None = None) -> None:
        log_dir = log_dir or trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero or self.allocator is None:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings.warn(
                "RankBudgetScheduler(heatmap=True) needs matplotlib (pip install matplotlib); no "
                "heatmap drawn",
                UserWarning,
                stacklevel=2,
            )
            return
        allocator = self.allocator
        title = (
            f"AdaLoRA kept rank at step {allocator.last_step} "
            f"(budget {allocator.kept()}/{allocator.init_budget}, target {allocator.target_budget})"
        )
        init_r = max(d.r for d in allocator.deltas.values())
        path = os.path.join(log_dir, filename)
        fig = plot_rank_heatmap(allocator.rank_pattern(), init_r, path, title)
        self.heatmap_path = path
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            try:
                if hasattr(experiment, "add_figure"):  # TensorBoard
                    experiment.add_figure("adalora/rank_heatmap", fig, global_step=allocator.last_step)
                elif hasattr(logger, "log_image"):  # W&B, and loggers with the same signature
                    logger.log_image(key="adalora/rank_heatmap", images=[path], step=allocator.last_step)
            except Exception as err:  # an image that cannot be logged must not stop training
                warnings.warn(
                    f"could not log the rank heatmap to {type(logger).__name__}: {err}",
                    UserWarning,
                    stacklevel=2,
                )


def add_to_loss(output: Any, pl_module: L.LightningModule, model_or_stack: Any) -> Any:
    """``output`` (a loss tensor or a dict with ``"loss"``) plus the weighted orthogonal regularizer."""
    if output is None:
        return None
    reg = orthogonal_regularization(model_or_stack)
    if isinstance(output, Tensor):
        result: Any = output + reg.to(output.dtype)
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        result = dict(output)
        result["loss"] = output["loss"] + reg.to(output["loss"].dtype)
    else:
        raise PeftConfigError(
            f"RankBudgetScheduler(add_orth_reg=True) cannot add the orthogonal regularizer to a training_step "
            f"output of type {type(output).__name__}; return a loss tensor or a dict with 'loss', or set "
            "add_orth_reg=False and add orthogonal_regularization(self) to your loss"
        )
    pl_module.log("adalora/orth_reg", reg.detach(), on_step=True, on_epoch=False, batch_size=1)
    return result


__all__ = ["RankBudgetScheduler", "add_to_loss"]
