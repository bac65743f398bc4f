"""``pip install aha-attention`` without extras: ``import aha``, the operator, ``aha.convert`` and
``aha.from_pretrained`` work without the optional packages, and a missing extra names its install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Top-level packages that only the extras bring (see aha._optional). tqdm is not among them:
#: transformers itself needs it (and numpy, pyyaml).
OPTIONAL = ("matplotlib", "typer", "rich", "gguf", "accelerate", "peft", "datasets", "lm_eval")

_BLOCK = textwrap.dedent(
    f"""
    import importlib.abc, sys
    BLOCKED = {OPTIONAL!r}

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    for name in BLOCKED:  # importlib.util.find_spec (availability checks) then sees them as not installed
        sys.modules[name] = None
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_core_works_without_the_optional_packages(tmp_path):
    done = _run(
        f"""
        import torch, aha
        from aha.hf.testing import tiny_model

        q = torch.randn(1, 4, 16, 8)
        k = v = torch.randn(1, 2, 16, 8)
        route = torch.rand(1, 4, 16) < 0.5
        assert aha.aha_attention(q, k, v, route, window=4).shape == (1, 4, 16, 8)

        model = aha.convert(tiny_model("llama"), window=4)
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        with torch.no_grad():
            expected = model.eval()(input_ids=ids).logits
        model.save_pretrained({str(tmp_path)!r})
        with torch.no_grad():
            assert torch.equal(aha.from_pretrained({str(tmp_path)!r})(input_ids=ids).logits, expected)
        leaked = sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & set(BLOCKED))
        assert not leaked, leaked
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_missing_extra_names_its_install():
    done = _run(
        """
        for module, extra in [("aha.cli", "cli"), ("aha.recipes.finetune", "train"), ("aha.report.plots", "eval")]:
            try:
                __import__(module)
            except ImportError as error:
                assert f"pip install 'aha-attention[{extra}]'" in str(error), (module, str(error))
            else:
                raise AssertionError(f"{module} imported without its extra")
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
