"""lowbit's GGUF files judged by llama.cpp itself (slow; needs a llama.cpp build: ``LLAMA_CPP_BIN`` = the folder of
its tools). llama.cpp is not a dependency, so without it these are skipped, saying why.

    LLAMA_CPP_BIN=~/llama.cpp/build/bin python -m pytest -m slow tests/integration/test_llama_cpp.py
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.data.corpora import evaluation_text

BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/nonexistent"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (BIN / "llama-perplexity").exists(),
                                                   reason="set LLAMA_CPP_BIN to a folder of llama.cpp's built tools")]
CHUNKS = 8


def lowbit(*args):
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    made = {"F32": out / "smol-f32.gguf"}
    lowbit("export", "smollm2-135m", "-o", made["F32"], "--dense", "F32")
    for kind in ("Q4_0", "Q4_K_M"):
        made[kind] = out / f"smol-{kind}.gguf"
        lowbit("quantize", "smollm2-135m", "-o", made[kind], "--method", "rtn", "--gguf", kind)
    (out / "persuasion.txt").write_text(evaluation_text("austen").text)
    return out, made


# Same file, same windows: float32 agrees to 0.001% (tokens and windows identical; 60 chunks: 29.7750 vs 29.7753).
# Quantized files differ by llama.cpp's arithmetic, not the weights: its CPU matmuls round the activations to 8 bits
# (Q8_0 / Q8_K) where lowbit multiplies float32 ones by the same weights (60 chunks: Q4_0 0.27%, Q4_K_M 0.55%).
@pytest.mark.parametrize("kind, tolerance", [("F32", 0.001), ("Q4_0", 0.005), ("Q4_K_M", 0.01)])
def test_llama_perplexity_of_lowbits_file_agrees_with_lowbits_own_evaluation(files, kind, tolerance):
    """llama-perplexity -c 512 of lowbit's file and lowbit eval --protocol llama.cpp of it."""
    out, made = files
    done = subprocess.run([BIN / "llama-perplexity", "-m", made[kind], "-f", out / "persuasion.txt", "-c", "512",
                           "--chunks", str(CHUNKS), "-t", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = float(re.search(r"Final estimate: PPL = ([\d.]+)", done.stdout + done.stderr).group(1))
    (mine,) = json.loads(lowbit("eval", made[kind], "--protocol", "llama.cpp", "--max-tokens", 512 * CHUNKS, "--json"))
    assert abs(mine["perplexity"] / theirs - 1) < tolerance, (mine["perplexity"], theirs)


def test_llama_cli_answers_sensibly_from_lowbits_file(files):
    _, made = files
    done = subprocess.run([BIN / "llama-cli", "-m", made["Q4_K_M"], "-p", "What is the capital of France?", "-n", "24",
                           "-st", "--temp", "0", "-t", "2"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout


def _llama_perplexity(path: Path, text: Path) -> float:
    done = subprocess.run([BIN / "llama-perplexity", "-m", path, "-f", text, "-c", "512", "--chunks", str(CHUNKS),
                           "-t", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", done.stdout + done.stderr).group(1))


def test_a_converted_hugging_face_tokenizer_tokenizes_as_the_models_own_gguf_does(files, tmp_path):
    """SmolLM2 saved as a Hugging Face folder (no GGUF of its own): its exported file, with the tokenizer converted,
    gets from llama.cpp the perplexity of the file carrying the GGUF's own tokenizer: same tokens, same windows."""
    from lowbit.models.loader import load_model

    out, made = files
    model, tokenizer, _ = load_model("smollm2-135m")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    lowbit("export", tmp_path / "hf", "-o", tmp_path / "hf.gguf", "--dense", "F32")
    text = out / "persuasion.txt"
    assert _llama_perplexity(tmp_path / "hf.gguf", text) == _llama_perplexity(made["F32"], text)
