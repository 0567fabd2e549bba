"""The official upstream configs, built through our reader on the meta device, give upstream's state dicts.

Compares key -> shape/dtype sets with ``reference/manifests/{gen}_{part}.json`` (made with upstream's
own classes): no key missing, none extra, same shapes.
"""

from __future__ import annotations

import functools
import json

import pytest

from cosytrain.modeldir import build_parts, load_upstream_config
from tests.conftest import load_manifest, reference_dir, require_reference

CONFIGS = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}


@functools.lru_cache(maxsize=None)
def _config(gen: str, qwen_dir: str | None):
    path = require_reference(reference_dir() / "configs" / CONFIGS[gen])
    overrides = {"qwen_pretrain_path": qwen_dir} if qwen_dir else None
    return load_upstream_config(path, overrides)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    """A CosyVoice-BlankEN stand-in holding only the Qwen2 config the manifests assume."""
    qwen2_config = load_manifest("v2_llm")["qwen2_config"]
    folder = tmp_path_factory.mktemp("CosyVoice-BlankEN")
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                    **qwen2_config}))
    return str(folder)


@pytest.mark.parametrize("part", ["llm", "flow", "hift"])
@pytest.mark.parametrize("gen", ["v1", "v2", "v3"])
def test_official_config_builds_manifest_state_dict(gen, part, qwen_dir):
    manifest = load_manifest(f"{gen}_{part}")
    cfg = _config(gen, qwen_dir if gen != "v1" else None)
    model = build_parts(cfg, parts=(part,), device="meta", source_name=CONFIGS[gen])[part]
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    ref = {k: (v["shape"], v["dtype"]) for k, v in manifest["keys"].items()}
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    assert not missing, f"{len(missing)} keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} extra keys, e.g. {extra[:5]}"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"{len(wrong)} keys differ (ours, upstream), e.g. {dict(list(wrong.items())[:5])}"
    assert all(t.is_meta for t in model.state_dict().values())
    assert type(model).__name__ == manifest["class"].rsplit(".", 1)[-1]
