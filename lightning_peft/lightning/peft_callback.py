"""The ``PEFT`` callback: parameter-efficient fine-tuning for an unmodified Trainer and LightningModule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_peft.core.state import ADDED, BASE_LAYER, get_state
from lightning_peft.core.targets import resolve_unfreeze
from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.lightning.checkpoint_io import restore_checkpoint_io, use_atomic_checkpoint_io
from lightning_peft.lightning.checkpointing import (
    check_optimizer_coverage,
    install_checkpoint_hooks,
    peft_target,
)
from lightning_peft.lightning.distributed import check_gradients_on_first_step, check_strategy, configure_ddp
from lightning_peft.lightning.precision import quantize_on_device, resolve_quantization
from lightning_peft.methods.base import Strategy, strategy_from_config
from lightning_peft.quantization import Quantization, prepare_for_kbit_training
from lightning_peft.stack.peft_stack import DEFAULT_SET, PeftStack, apply_peft


class PEFT(Callback):
    """Freeze the backbone, apply a stack of PEFT strategies in ``setup``, and keep checkpoints adapter-only.

    The stack is applied before ``configure_optimizers`` runs, so an optimizer built there over
    ``requires_grad`` parameters sees exactly the adapters. At fit start the callback checks that every
    trainable parameter is in an optimizer. Every checkpoint Lightning writes holds the adapter weights,
    buffers (e.g. AdaLoRA masks) and the stack's description, not the frozen backbone;
    ``trainer.fit(ckpt_path=...)`` resumes from it.

    Args:
        strategies: the strategies to stack, applied in order (e.g. ``[LoRA(r=8)]``).
        unfreeze: modules or parameters trained fully (names, dotted suffixes or a regex), e.g. a new head.
        model_attr: apply to this (dotted) attribute of the LightningModule, e.g. ``"model"``; ``None`` for
            the module itself.
        name: the adapter set's name.
        quantize: quantize the backbone with bitsandbytes in ``setup``, before injecting (adapters stay
            unquantized); works with ``accelerator="cpu"``. With Lightning's ``BitsandbytesPrecision`` plugin
            the plugin's settings are used (see :mod:`lightning_peft.lightning.precision`).
        gradient_checkpointing: turn on the model's gradient checkpointing (a Hugging Face model, see
            ``model_attr``), with the input embeddings' output requiring grad so the frozen backbone still
            passes gradients to the adapters (:func:`~lightning_peft.quantization.kbit.prepare_for_kbit_training`).
        replace: what ``setup`` does when the module already holds an adapter set named ``name`` whose
            configuration (strategies and their settings, ``unfreeze``, ``quantize``) differs from this
            callback's, e.g. after an earlier ``fit`` with another ``PEFT`` callback: ``False`` (default) raises
            :class:`~lightning_peft.errors.PeftConfigError` showing both configurations; ``True`` removes that
            set (its trained weights are lost) and applies this callback's. The same configuration found again
            (fitting the same module twice, resuming) is kept either way.
        pretrained: an adapter folder to continue training (a :func:`~lightning_peft.io.adapters.save_adapters`
            folder, or one Hugging Face ``peft`` wrote): ``setup`` loads it instead of applying ``strategies``,
            which must then be empty (as ``unfreeze`` and ``quantize``: the folder says them). The same as
            :meth:`PEFT.from_pretrained`, for configs: ``init_args: {strategies: [], pretrained: adapters/}``.

    Several ``PEFT`` callbacks can share a Trainer when each adapts its own model (``model_attr``); every
    checkpoint holds all their adapters and each callback's state is stored under its own ``state_key``. Two
    callbacks on one model (or on a model and a part of it) are refused: a model computes with one adapter set
    at a time.

    Example:
        >>> trainer = L.Trainer(callbacks=[PEFT([LoRA(r=8, target_modules=["query", "value"])],
        ...                                     unfreeze=["classifier"])])
    """

    def __init__(
        self,
        strategies: Sequence[Strategy],
        unfreeze: list[str] | str | None = None,
        model_attr: str | None = None,
        name: str = DEFAULT_SET,
        quantize: Quantization | None = None,
        gradient_checkpointing: bool = False,
        replace: bool = False,
        pretrained: str | None = None,
    ) -> None:
        if not isinstance(replace, bool):
            raise PeftConfigError(f"replace={replace!r} is not valid; expected True or False")
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise PeftConfigError(f"pretrained={pretrained!r} is not valid; expected the path of an adapter folder")
        if pretrained is not None and (strategies or quantize is not None or unfreeze):
            raise PeftConfigError(
                f"pretrained={os.fspath(pretrained)!r} loads the folder's own strategies, unfreeze and quantization; "
                "give strategies=[] and no unfreeze or quantize with it (or leave pretrained out to apply them)"
            )
        self.replace = replace
        self.strategies = [strategy_from_config(s) for s in strategies]
        self.quantize = quantize
        self.gradient_checkpointing = gradient_checkpointing
        self._quantize = quantize
        self._quantize_device: Any = None
        self.unfreeze = unfreeze
        self.model_attr = model_attr
        self.name = name
        self.stack: PeftStack | None = None
        #: an adapter folder ``setup`` loads instead of applying ``strategies`` (see :meth:`from_pretrained`)
        self.pretrained: str | None = os.fspath(pretrained) if pretrained is not None else None

    @classmethod
    def from_pretrained(
        cls,
        dirpath: str | os.PathLike,
        model_attr: str | None = None,
        name: str = DEFAULT_SET,
        gradient_checkpointing: bool = False,
        replace: bool = False,
    ) -> PEFT:
        """A callback that continues training the adapters in ``dirpath``.

        In ``setup`` it loads the folder onto the module's model with
        :func:`~lightning_peft.io.adapters.load_adapters` (a folder written by ``save_adapters`` or
        ``AdapterExport``, or by Hugging Face ``peft``'s ``save_pretrained``) instead of applying fresh strategies;
        the loaded stack then trains, checkpoints adapter-only and resumes like any other. The folder is read only
        when ``setup`` runs, and every load error is raised there, before the model changes.

        Args:
            dirpath: the adapter folder.
            model_attr: as for :class:`PEFT`.
            name: the set is loaded under this name (as for :class:`PEFT`).
            gradient_checkpointing: as for :class:`PEFT`.
            replace: whether a different set already named ``name`` on the module is replaced (see :class:`PEFT`).

        Example:
            >>> trainer = L.Trainer(callbacks=[PEFT.from_pretrained("peft-adapter/", model_attr="model")])
        """
        if not isinstance(dirpath, (str, os.PathLike)):
            raise PeftConfigError(f"dirpath={dirpath!r} is not valid; expected the path of an adapter folder")
        return cls([], model_attr=model_attr, name=name, gradient_checkpointing=gradient_checkpointing,
                   replace=replace, pretrained=os.fspath(dirpath))

    def __repr__(self) -> str:
        return f"PEFT(name={self.name!r}, model_attr={self.model_attr!r})"

    @property
    def state_key(self) -> str:
        """Unique per adapter set and model part, so several PEFT callbacks can share a Trainer."""
        return self._generate_state_key(name=self.name, model_attr=self.model_attr)

    def _existing(self, pl_module: L.LightningModule) -> PeftStack | None:
        state = get_state(peft_target(pl_module, self.model_attr))
        return state.stacks.get(self.name) if state is not None else None

    def _configuration(self, target: nn.Module) -> dict[str, Any]:
        """This callback's stack as :meth:`PeftStack.describe` would record it on ``target``."""
        try:
            unfreeze: Any = [n for n in resolve_unfreeze(target, self.unfreeze)
                             if not ADDED.search(n + ".") and f".{BASE_LAYER}" not in n]
        except PeftConfigError:  # matches nothing on this model: certainly not the stack's
            unfreeze = self.unfreeze
        quantization = self._quantize.config() if self._quantize is not None else None
        return {"name": self.name, "strategies": [s.config() for s in self.strategies], "unfreeze": unfreeze,
                "quantization": quantization}

    def _check_existing(self, pl_module: L.LightningModule, stack: PeftStack) -> bool:
        """Whether ``stack`` (found on the module under this callback's name) is this callback's configuration.

        A different one is removed with ``replace=True`` (returns ``False``), else refused before anything changes.
        """
        target = peft_target(pl_module, self.model_attr)
        wanted = self._configuration(target)
        have = {"name": stack.name, "strategies": [s.config() for s in stack.strategies],
                "unfreeze": list(stack.unfreeze),
                "quantization": stack.quantization.config() if stack.quantization is not None else None}
        same = (have["strategies"] == wanted["strategies"] and sorted(have["unfreeze"]) == sorted(wanted["unfreeze"])
                and (self._quantize is None or _same_quantization(stack.quantization, self._quantize)))
        if same:
            return True
        if self.replace:
            return False
        where = type(target).__name__ if not self.model_attr else f"{type(pl_module).__name__}.{self.model_attr}"
        raise PeftConfigError(
            f"{self!r}: {where} already has adapter set {self.name!r} with another configuration (e.g. from an "
            "earlier fit with another PEFT callback); keeping it would train and checkpoint that stack, not this "
            f"callback's.\n  on the module:  {_show(have)}\n  this callback: {_show(wanted)}\n"
            "Pass PEFT(..., replace=True) to remove the old set (its trained weights are lost) and apply this one, "
            "or fit a fresh module."
        )

    def _check_siblings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before the model is touched, another PEFT callback on the same model (or a part of it)."""
        mine = peft_target(pl_module, self.model_attr)
        for other in getattr(trainer, "callbacks", []):
            if other is self or not isinstance(other, PEFT):
                continue
            theirs = peft_target(pl_module, other.model_attr)
            if theirs is mine or any(m is mine for m in theirs.modules()) or any(m is theirs for m in mine.modules()):
                raise PeftConfigError(
                    f"{self!r} and {other!r} both adapt {type(mine).__name__}: a model computes with one adapter "
                    "set at a time (the active one), so the later set would freeze and switch off the earlier one "
                    "and only one would train. Put every strategy in one PEFT callback's strategies list, give each "
                    "callback its own model (model_attr), or fit once per adapter set."
                )

    def apply(self, pl_module: L.LightningModule) -> PeftStack:
        """Apply the stack to ``pl_module`` now (idempotent); ``setup`` calls this.

        An adapter set of this name already on the module is kept when its configuration is this callback's;
        otherwise see ``replace``.
        """
        stack = self._existing(pl_module)
        if stack is not None and not self._check_existing(pl_module, stack):
            from lightning_peft.stack.sets import unload

            unload(peft_target(pl_module, self.model_attr), self.name)
            stack = None
        if stack is None:
            target = peft_target(pl_module, self.model_attr)
            if self.pretrained is not None:
                stack = self._load_pretrained(target)
            else:
                # quantize on the GPU, not the CPU, unless a strategy must read the full-precision weights first
                # (LoftQ, PiSSA: apply_peft then quantizes, after them)
                if (self._quantize is not None and self._quantize_device is not None
                        and not any(s.changes_base for s in self.strategies)):
                    quantize_on_device(target, self._quantize, self.unfreeze, self._quantize_device)
                stack = apply_peft(target, self.strategies, unfreeze=self.unfreeze, name=self.name,
                                   quantize=self._quantize)
            if stack.quantization is not None or self.gradient_checkpointing:
                prepare_for_kbit_training(target, gradient_checkpointing=self.gradient_checkpointing)
        self.stack = stack
        install_checkpoint_hooks(pl_module, lambda: self.stack, self.model_attr)
        return stack

    def _load_pretrained(self, target: nn.Module) -> PeftStack:
        from lightning_peft.io.adapters import load_adapters

        stack = load_adapters(target, self.pretrained, name=self.name)  # type: ignore[arg-type]
        # from now on this callback's configuration is the loaded one (a second fit or a resume keeps the set)
        self.strategies = list(stack.strategies)
        self.unfreeze = list(stack.unfreeze) or None
        self._quantize = stack.quantization
        return stack

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._quantize = resolve_quantization(self.quantize, trainer.precision_plugin, self.model_attr)
        root = trainer.strategy.root_device
        self._quantize_device = root if root.type == "cuda" else None
        self._check_siblings(trainer, pl_module)
        check_strategy(trainer, peft_target(pl_module, self.model_attr), self._quantize)  # FSDP/DeepSpeed limits
        stack = self.apply(pl_module)
        configure_ddp(trainer, stack)  # before the strategy wraps the model in DistributedDataParallel
        use_atomic_checkpoint_io(trainer)  # checkpoints never half-written, whatever /tmp is
        if stage == "fit" and trainer.is_global_zero:
            total = sum(p.numel() for p in stack.trainable_parameters())
            L.pytorch.utilities.rank_zero_info(
                f"lightning_peft: {stack.describe_short()} trains {total:,} parameters\n{stack.summary()}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_optimizer_coverage(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        check_gradients_on_first_step(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        restore_checkpoint_io(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"stack": self.stack.describe() if self.stack is not None else None, "model_attr": self.model_attr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check, when resuming, that the checkpoint's set is the one this callback applied in ``setup``.

        The adapter weights themselves are restored with the module's state dict (before this is called).
        """
        saved = state_dict.get("stack")
        if saved is None or self.stack is None:
            return
        ours = self.stack.describe()
        saved_kinds = [s["name"] for s in saved.get("strategies", [])]
        our_kinds = [s["name"] for s in ours["strategies"]]
        if saved.get("name") != ours["name"] or saved_kinds != our_kinds:
            raise AdapterStateError(
                f"{self!r}: the checkpoint's adapter set is {saved.get('name')!r} {saved_kinds}, this callback's is "
                f"{ours['name']!r} {our_kinds}; resume with the PEFT callback the checkpoint was written with"
            )


def _same_quantization(have: Quantization | None, wanted: Quantization) -> bool:
    from lightning_peft.quantization.config import settings_key as _settings

    return have is not None and _settings(have) == _settings(wanted)


def _show(config: dict[str, Any]) -> str:
    strategies = ", ".join(repr(strategy_from_config(dict(c))) for c in config["strategies"])
    return f"strategies=[{strategies}], unfreeze={config['unfreeze']!r}, quantization={config['quantization']!r}"
