"""The attribute names under which strategies attach what they add to a model, in one place.

Every strategy that must recognise another's parameters (e.g. ``Unfreeze`` skipping adapter weights, the
bottleneck adapter's target filter) reads these, never a spelled-out string.
"""

from __future__ import annotations

import re

#: the per-set deltas of an adapted linear: ``<layer>.adapters.<set>.<strategy>.*``
DELTAS = "adapters"
#: bottleneck adapters, on the module they follow: ``<module>.lightning_peft_adapter.<set>.*``
ADAPTER_CONTAINER = "lightning_peft_adapter"
#: prompt providers, on the prompted model: ``lightning_peft_prompts.sets.<set>.*``
PROMPT_HOST = "lightning_peft_prompts"
#: the frozen base layer inside an adapted linear
BASE_LAYER = "base_layer"

#: a parameter or module name inside something a strategy added (not the user's model)
ADDED = re.compile(rf"(^|\.)({DELTAS}|{ADAPTER_CONTAINER}|{PROMPT_HOST})\.")
