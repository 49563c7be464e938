"""What a prompted model returns, aligned with the caller's inputs: the virtual positions cut from every
sequence-shaped output (hidden states, attentions, logits)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _strip(t: Any, n: int, total: int) -> Any:
    if isinstance(t, Tensor):
        if t.dim() == 4 and t.shape[-1] == total and t.shape[-2] == total:
            return t[..., n:, n:]
        if t.dim() >= 2 and t.shape[1] == total:
            return t[:, n:]
        return t
    if isinstance(t, tuple) and all(isinstance(x, Tensor) for x in t):
        return tuple(_strip(x, n, total) for x in t)
    return t


def _strip_logits(t: Tensor, n: int, total: int, lead: int | None) -> Tensor:
    """Logits aligned with the caller's input, contiguous (user code commonly calls ``logits.view(-1, vocab)``)."""
    if lead is None:
        return _strip(t, n, total).contiguous()
    return t[:, lead:].contiguous() if lead else t


def strip_output(
    output: Any, n: int, total: int, encoder_decoder: bool, keep_logits: bool = False, lead: int | None = None
) -> Any:
    """Remove the ``n`` virtual positions from what the model returned (sequence length ``total``).

    ``lead`` (when not ``None``): the logits were computed for the last ``total - n + lead`` positions only, so
    ``lead`` leading positions are cut from them instead.
    """
    if isinstance(output, dict):  # ModelOutput
        for key in list(output.keys()):
            value = output[key]
            if encoder_decoder:
                if key.startswith("encoder_"):
                    output[key] = _strip(value, n, total)
                elif key == "cross_attentions" and isinstance(value, tuple):
                    output[key] = tuple(x[..., n:] if x.shape[-1] == total else x for x in value)
            elif key in ("last_hidden_state", "hidden_states", "attentions", "start_logits", "end_logits"):
                output[key] = _strip(value, n, total)
            elif key == "logits" and not keep_logits and isinstance(value, Tensor) and value.dim() >= 3:
                output[key] = _strip_logits(value, n, total, lead)
        return output
    if isinstance(output, tuple) and not encoder_decoder:  # return_dict=False: strip sequence-shaped entries
        out = []
        for x in output:
            if isinstance(x, Tensor) and lead is not None and x.dim() >= 3 and x.shape[1] == total - n + lead:
                out.append(_strip_logits(x, n, total, lead))
            elif isinstance(x, Tensor):
                out.append(_strip(x, n, total).contiguous() if x.dim() >= 3 else x)
            else:
                out.append(_strip(x, n, total))
        return tuple(out)
    return output


__all__ = ["strip_output"]
