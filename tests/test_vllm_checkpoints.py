"""The dense baseline of a saved AHA model (aha.integrations.vllm.checkpoints): plain family weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import aha
from aha.hf.testing import tiny_model
from aha.integrations.vllm.checkpoints import write_plain_checkpoint


@pytest.mark.parametrize(("family", "layout"), [("llama", "separate"), ("llama", "fused"), ("qwen2", "fused")])
def test_plain_checkpoint_is_the_aha_model_forced_global(tmp_path, family, layout):
    model = aha.convert(tiny_model(family), window=4, sink=1, router_init="random", router_layout=layout, layers=[1])
    model.save_pretrained(tmp_path / "aha")
    write_plain_checkpoint(tmp_path / "aha", tmp_path / "plain")

    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == family and "aha" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert not aha.is_aha_model(plain)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), aha.force_routing(model, "global"):
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_plain_folder_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a saved AHA model"):
        write_plain_checkpoint(tmp_path, tmp_path / "plain")
