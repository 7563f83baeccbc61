"""The model-naming helper (scrimp.models) and the shared Hugging Face plumbing (scrimp.hf)."""
import argparse
import ast
import os

import pytest
import torch

import scrimp
from scrimp import hf, models

from hf_models import ARCHS, SUPPORTED_ARCHS, make_checkpoint

PKG = os.path.dirname(scrimp.__file__)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: make_checkpoint(a, root) for a in ARCHS}


def test_testbed_spec_loads_the_shipped_checkpoint():
    model, tok = scrimp.load_model("testbed:recall", device="cpu", dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert models.resolve_model_spec("testbed:recall").endswith(os.path.join("checkpoints", "recall"))


@pytest.mark.parametrize("arch", ARCHS)
def test_directory_spec_loads_any_architecture(ckpts, arch):
    model, tok = models.load_model(ckpts[arch], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.vocab_size == len(tok)
    ids = tok("the river", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("spec,err,words", [
    ("testbed:nope", ValueError, "unknown testbed model"),
    ("testbed:", ValueError, "names no model"),
    ("weird:thing", ValueError, "unknown model source 'weird'"),
    ("/definitely/not/here", FileNotFoundError, "does not exist"),
    ("", ValueError, "empty model spec"),
])
def test_bad_specs_are_refused_by_name(spec, err, words):
    with pytest.raises(err, match=words):
        models.resolve_model_spec(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.resolve_model_spec(str(tmp_path))


def test_hub_ids_pass_through_unchanged():
    assert models.resolve_model_spec("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_device_and_dtype_resolution():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type in ("cpu", "cuda")
    assert models.resolve_dtype("auto") is None and models.resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="invalid dtype"):
        models.resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating-point"):
        models.resolve_dtype(torch.int32)
    with pytest.raises(ValueError, match="invalid device"):
        models.resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_cli_arguments_share_one_meaning():
    p = argparse.ArgumentParser()
    models.add_model_arguments(p, "--student", "--teacher", default=None, required=True)
    a = p.parse_args(["--student", "testbed:arith-student", "--teacher", "/x", "--dtype", "bfloat16"])
    assert (a.student, a.teacher, a.device, a.dtype) == ("testbed:arith-student", "/x", "auto", "bfloat16")
    assert all(act.help for act in p._actions)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_plumbing_finds_the_parts(ckpts, arch):
    model, _ = models.load_model(ckpts[arch])
    assert len(hf.decoder_layers(model)) == model.config.num_hidden_layers
    assert hf.lm_head(model).weight.shape[0] == model.config.vocab_size
    assert hasattr(hf.rotary_embedding(model), "inv_freq")
    assert hf.model_features(model.config, model) == {}
    hf.refuse_features(model.config, "test", model=model)


def test_features_are_refused_by_name(ckpts):
    model, _ = models.load_model(ckpts["gemma2"])
    feats = hf.model_features(model.config, model)
    assert {"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"} <= set(feats)
    with pytest.raises(ValueError, match=r"IceCache cannot run this gemma2 model exactly: sliding_window .*layers \[0\]"):
        hf.refuse_features(model.config, "IceCache", refuse=("sliding_window",))
    hf.refuse_features(model.config, "X", refuse=("logit_scale",))  # not present: no error
    sliding, _ = models.load_model(ckpts["mistral-sliding"])
    with pytest.raises(ValueError, match="sliding_window"):
        hf.refuse_features(sliding.config, "IceCache")
    with pytest.raises(ValueError, match="unknown feature"):
        hf.refuse_features(sliding.config, "X", refuse=("nonsense",))


# Modules that may choose the testbed as their default: command lines, demos and benchmarks.
TESTBED_CLIENTS = ("cli.py", "demo.py", "bench.py", "benchmarks.py")


def _imports_testbed(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = [a.name for a in node.names]
            if "testbed" in mod.split(".") or "testbed" in names:
                return True
        if isinstance(node, ast.Import) and any("testbed" in a.name.split(".") for a in node.names):
            return True
    return False


def test_library_modules_never_import_the_testbed():
    offenders = []
    for root, _, files in os.walk(PKG):
        if os.path.join("scrimp", "testbed") in root:
            continue
        for f in files:
            if f.endswith(".py") and f not in TESTBED_CLIENTS and _imports_testbed(os.path.join(root, f)):
                offenders.append(os.path.relpath(os.path.join(root, f), PKG))
    assert offenders == [], f"library modules importing scrimp.testbed: {offenders}"
