"""The core: which layers to adapt (targets), the adapted layer and its composition rule, the per-model state.

Nothing here imports Lightning, the strategies or anything else of this package but :mod:`lightning_peft.errors`.
"""
