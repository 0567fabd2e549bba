"""Reading upstream HyperPyYAML configs without executing them, and writing them back."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosytrain.modeldir import builder, registry
from cosytrain.modeldir import (
    Apply,
    Name,
    New,
    Ref,
    StateDictMismatchError,
    UpstreamConfigError,
    build_parts,
    check_state_dict,
    dump_upstream_yaml,
    find_config,
    generation_of,
    load_model_dir_config,
    load_upstream_config,
)
from cosytrain.modeldir.yaml_resolver import safe_arithmetic
from tests.conftest import load_fixture, reference_dir, require_reference

GENERATIONS = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}


def reference_config(gen: str) -> Path:
    return require_reference(reference_dir() / "configs" / GENERATIONS[gen])


def refused(text: str, *fragments: str, **kwargs) -> str:
    """Load ``text``, expect our one-line error containing every fragment, return the message."""
    with pytest.raises(UpstreamConfigError) as info:
        load_upstream_config(text, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------
# official configs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gen", sorted(GENERATIONS))
def test_reference_config_parses_into_inert_nodes(gen):
    cfg = load_upstream_config(reference_config(gen))
    assert generation_of(cfg) == gen
    for part in ("llm", "flow", "hift"):
        assert isinstance(cfg[part], New) and cfg[part].target.startswith("cosyvoice.")
    assert isinstance(cfg["__set_seed3"], Apply) and cfg["__set_seed3"].args == [1986]
    assert isinstance(cfg["feat_extractor"], Name)
    assert cfg["feat_extractor"].target == "matcha.utils.audio.mel_spectrogram"
    # a full !ref shares the node (hyperpyyaml semantics), so hifigan.generator is the same hift
    assert cfg["hifigan"].kwargs["generator"] is cfg["hift"]
    assert cfg["data_pipeline"][1] is cfg["tokenize"]
    assert cfg["tokenize"].kwargs["get_tokenizer"] is cfg["get_tokenizer"]
    # YAML 1.2 exponent floats are numbers, as upstream's ruamel pass reads them
    assert cfg["flow"].kwargs["decoder"].kwargs["cfm_params"].kwargs["content"]["sigma_min"] == 1e-6
    assert cfg["hift"].kwargs["sampling_rate"] == cfg["sample_rate"]


def test_refs_and_arithmetic_resolve_in_official_v2_config():
    cfg = load_upstream_config(reference_config("v2"))
    estimator = cfg["flow"].kwargs["decoder"].kwargs["estimator"].kwargs
    # `!ref <chunk_size> * <token_mel_ratio>`
    assert estimator["static_chunk_size"] == cfg["chunk_size"] * cfg["token_mel_ratio"]
    assert isinstance(estimator["static_chunk_size"], int)
    assert estimator["num_decoding_left_chunks"] == cfg["num_decoding_left_chunks"]
    assert cfg["llm"].kwargs["llm_input_size"] == cfg["llm_input_size"]


def test_qwen_override_reaches_every_reference():
    cfg = load_upstream_config(reference_config("v3"), overrides={"qwen_pretrain_path": "/models/x/CosyVoice-BlankEN"})
    assert cfg["llm"].kwargs["llm"].kwargs["pretrain_path"] == "/models/x/CosyVoice-BlankEN"
    assert cfg["get_tokenizer"].kwargs["token_path"] == "/models/x/CosyVoice-BlankEN"
    refused(reference_config("v3").read_text(), "override", "'no_such_key'", overrides={"no_such_key": 1})


def test_nested_and_yaml_text_overrides():
    text = "a: 2\nb: {c: 1, d: !ref <a>}\nm: !new:cosyvoice.flow.length_regulator.InterpolateRegulator\n  channels: 80\n"
    cfg = load_upstream_config(text, overrides="b: {c: 5}\nm: {channels: !ref <a>}\n")
    assert cfg["b"] == {"c": 5, "d": 2}
    assert cfg["m"].kwargs == {"channels": 2}  # like hyperpyyaml, a mapping override merges into kwargs
    assert load_upstream_config(text, overrides={"m": None})["m"] is None


@pytest.mark.parametrize("gen", sorted(GENERATIONS))
def test_dump_round_trip(gen):
    cfg = load_upstream_config(reference_config(gen))
    text = dump_upstream_yaml(cfg, header="written by cosytrain")
    again = load_upstream_config(text)
    assert again == cfg
    assert list(again) == list(cfg)
    assert again["hifigan"].kwargs["generator"] is again["hift"]  # written back as `!ref <hift>`
    assert "generator: !ref <hift>" in text
    assert text.startswith("# written by cosytrain\n")
    # the unresolved tree round-trips too and resolves to the same values
    raw = load_upstream_config(reference_config(gen), resolve=False)
    raw_text = dump_upstream_yaml(raw)
    assert load_upstream_config(raw_text, resolve=False) == raw
    assert load_upstream_config(raw_text) == cfg
    if gen != "v1":
        assert "!ref <chunk_size> * <token_mel_ratio>" in raw_text


def test_dump_quotes_strings_that_would_read_back_as_numbers_or_tuples():
    tree = {"a": "1e-06", "b": "(1, 2)", "c": (1, 2.5, "x"), "d": 1e-06, "e": [[1, 2], [3]], "f": None,
            "g": New("cosyvoice.flow.length_regulator.InterpolateRegulator", [], {"channels": 80}),
            "h": Name("cosyvoice.utils.common.ras_sampling")}
    again = load_upstream_config(dump_upstream_yaml(tree))
    assert again == tree
    assert isinstance(again["d"], float) and isinstance(again["a"], str) and again["c"] == (1, 2.5, "x")


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------


def test_reference_forms():
    cfg = load_upstream_config(
        "a: 3\nb: 4\nroot: exp\n"
        "p: !ref <a> * <b>\nq: !ref (<a> + 1) // 3\nr: !ref <a> / <b>\ns: !ref <root>/save\n"
        "t: !ref -<a> ** 2\nnest: {x: {y: 7}}\nu: !ref <nest[x][y]>\nv: !ref <p>\n"
        "w: !copy <nest>\nz: !ref <nest>\ntup: (1, 2)\n"
    )
    assert (cfg["p"], cfg["q"], cfg["r"], cfg["s"], cfg["t"]) == (12, 1, 0.75, "exp/save", -9)
    assert cfg["u"] == 7 and cfg["v"] == 12
    assert cfg["w"] == cfg["nest"] and cfg["w"] is not cfg["nest"] and cfg["z"] is cfg["nest"]
    assert cfg["tup"] == (1, 2)


def test_safe_arithmetic_never_evaluates_names(tmp_path):
    marker = tmp_path / "pwned"
    assert safe_arithmetic("2 * (3 + 4) // 5") == 2
    assert safe_arithmetic(f"__import__('os').system('touch {marker}')") is None
    assert safe_arithmetic("9 ** 9 ** 9") is None  # refused, not computed
    assert safe_arithmetic("True + 1") is None
    cfg = load_upstream_config(f"a: 1\nb: !ref <a> + __import__('os').system('touch {marker}')\n")
    assert isinstance(cfg["b"], str)  # left as text, like hyperpyyaml's failed arithmetic
    assert not marker.exists()
    refused("a: 0\nb: !ref 1 / <a>\n", "division by zero")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a: !ref <b>\nb: !ref <a>\n", "circular reference"),
        ("a: !ref <nope>\n", "<nope> matches no key"),
        ("a: {b: 1}\nc: !ref <a.b>\n", "attribute reference"),
        ("a: !PLACEHOLDER\n", "a: is a !PLACEHOLDER"),
        ("a: [1]\nb: !ref <a> + 1\n", "is not a scalar"),
    ],
)
def test_bad_references_are_one_line_errors(text, fragment):
    refused(text, fragment)


def test_placeholder_filled_by_override():
    assert load_upstream_config("a: !PLACEHOLDER\nb: !ref <a>\n", overrides={"a": 5})["b"] == 5


def test_include_stays_inside_the_config_folder(tmp_path):
    (tmp_path / "sub.yaml").write_text("x: 1\ny: !ref <x> + 1\n")
    (tmp_path / "main.yaml").write_text("inc: !include:sub.yaml\n  x: 10\n")
    assert load_upstream_config(tmp_path / "main.yaml")["inc"] == {"x": 10, "y": 11}
    (tmp_path / "evil.yaml").write_text("inc: !include:../../etc/passwd\n")
    with pytest.raises(UpstreamConfigError, match="must name a file inside"):
        load_upstream_config(tmp_path / "evil.yaml")
    refused("inc: !include:sub.yaml\n", "needs the config read from a file")


# ------------------------------------------------------------------------------------------------
# hostile configs: refused, nothing runs
# ------------------------------------------------------------------------------------------------


HOSTILE = [
    ('x: !apply:os.system ["touch {m}"]\n', "x: !apply:os.system is not run"),
    ('__set_seed9: !apply:os.system ["touch {m}"]\n', "__set_seed9: !apply:os.system is not run"),
    ("x: !new:subprocess.Popen\n  args: [touch, {m}]\n", "x: unknown class 'subprocess.Popen' (!new:subprocess.Popen)"),
    ("x: !name:builtins.eval [\"open('{m}', 'w')\"]\n", "x: unknown function 'builtins.eval' (!name:builtins.eval)"),
    ("x: !name:os.system\n", "unknown function 'os.system'"),
    ("x: !module:os\n", "x: module tag (!module:os) is refused"),
    ('x: !!python/object/apply:os.system ["touch {m}"]\n', "python tag '!!python/object/apply:os.system' is refused"),
    ('x: !!python/object/new:subprocess.Popen [["touch", "{m}"]]\n', "python tag"),
    ("x: !!python/name:os.system\n", "python tag"),
    ("x: !evil 1\n", "unknown yaml tag '!evil'"),
    ("llm: !new:foo.Bar\n  size: 3\n", "cfg.yaml: llm: unknown class 'foo.Bar' (!new:foo.Bar); cosytrain builds only known"),
    ("flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec\n  decoder: !new:foo.Bar {{}}\n",
     "cfg.yaml: flow.decoder: unknown class 'foo.Bar' (!new:foo.Bar)"),
    ("p: [!ref <q>]\nq: !apply:shutil.rmtree [\"{m}\"]\n", "q: !apply:shutil.rmtree is not run"),
]


@pytest.mark.parametrize("text, fragment", HOSTILE)
def test_hostile_config_is_refused_and_runs_nothing(tmp_path, text, fragment):
    marker = tmp_path / "pwned"
    path = tmp_path / "cfg.yaml"
    path.write_text(text.format(m=marker))
    with pytest.raises(UpstreamConfigError) as info:
        load_upstream_config(path)
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)
    with pytest.raises(UpstreamConfigError):
        build_parts(path, parts=("llm",))
    assert not marker.exists()


def test_hostile_override_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    refused("a: 1\n", "unknown function 'os.system'", overrides={"a": Name("os.system", [f"touch {marker}"])})
    refused("a: 1\n", "is not run", overrides=f'a: !apply:os.system ["touch {marker}"]')
    assert not marker.exists()


def test_hostile_tree_is_refused_by_the_builder(tmp_path):
    marker = tmp_path / "pwned"
    tree = {"hift": New("cosyvoice.hifigan.generator.HiFTGenerator", [], {"f0_predictor": Apply("os.system", [f"touch {marker}"])})}
    with pytest.raises(UpstreamConfigError, match=r"hift.f0_predictor: !apply:os.system is not run"):
        build_parts(tree, parts=("hift",), device="meta")
    with pytest.raises(UpstreamConfigError, match=r"unknown class 'os.Popen'"):
        builder.build_from_fixture_config({"class": "cosyvoice.hifigan.generator.HiFTGenerator",
                                            "f0_predictor": {"class": "os.Popen", "args": ["touch", str(marker)]}})
    assert not marker.exists()


def test_seed_setters_are_ignored_and_inert_sections_not_built():
    cfg = load_upstream_config(reference_config("v1"))
    assert all(isinstance(cfg[f"__set_seed{i}"], Apply) for i in range(1, 5))
    with pytest.raises(UpstreamConfigError, match=r"hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan is recognised but not built"):
        build_parts(cfg, parts=("hifigan",))
    with pytest.raises(UpstreamConfigError, match=r"has no 'nope' section"):
        build_parts(cfg, parts=("nope",))


# ------------------------------------------------------------------------------------------------
# building and checking
# ------------------------------------------------------------------------------------------------


def test_missing_cosytrain_class_says_not_implemented(monkeypatch):
    cfg = load_upstream_config(reference_config("v2"))
    monkeypatch.setitem(registry.CLASSES, "cosyvoice.hifigan.generator.HiFTGenerator", "cosytrain.models.hift.generator:NoSuch")
    with pytest.raises(UpstreamConfigError, match=r"hift: 'cosyvoice.hifigan.generator.HiFTGenerator' maps to .*not implemented yet in cosytrain"):
        build_parts(cfg, parts=("hift",), device="meta")
    monkeypatch.setitem(registry.CLASSES, "cosyvoice.hifigan.generator.HiFTGenerator", "cosytrain.models.no_such_module:X")
    with pytest.raises(UpstreamConfigError, match="not implemented yet in cosytrain"):
        build_parts(cfg, parts=("hift",), device="meta")


def test_wrong_argument_names_the_path():
    text = ("hift: !new:cosyvoice.hifigan.generator.HiFTGenerator\n"
            "  f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor\n    no_such_arg: 1\n")
    with pytest.raises(UpstreamConfigError, match=r"hift.f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor does not take these arguments"):
        build_parts(text, parts=("hift",), device="meta")


def test_fixture_config_builds_and_loads_strictly():
    import torch

    fx = load_fixture("hift_v1")
    model = builder.build_from_fixture_config(fx["config"])
    check_state_dict(model, fx["state_dict"], "hift_v1")
    model.load_state_dict(fx["state_dict"], strict=True)
    assert torch.equal(model.state_dict()["conv_pre.bias"], fx["state_dict"]["conv_pre.bias"])


def test_check_state_dict_names_missing_unexpected_and_mismatched_keys():
    import torch

    fx = load_fixture("hift_v1")  # base_channels 32, the official config says 512
    model = build_parts(reference_config("v1"), parts=("hift",), device="meta")["hift"]
    sd = dict(fx["state_dict"])
    sd.pop("conv_post.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        check_state_dict(model, sd, "hift.pt")
    message = str(info.value)
    assert "\n" not in message and message.startswith("hift.pt: state dict does not fit")
    assert "1 missing (conv_post.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "shape-mismatched (conv_pre.bias: model [512] vs checkpoint [32], " in message
    assert "conv_pre.parametrizations.weight.original0: model [512, 1, 1] vs checkpoint [32, 1, 1]" in message
    assert ", ... 217 more)" in message  # first few listed, the rest counted
    small = builder.build_from_fixture_config(fx["config"], device="meta")
    check_state_dict(small, fx["state_dict"])  # matching sizes: no error


def test_model_dir_lookup(tmp_path):
    with pytest.raises(UpstreamConfigError, match="no cosyvoice.yaml"):
        find_config(tmp_path)
    (tmp_path / "cosyvoice2.yaml").write_text(reference_config("v2").read_text())
    assert find_config(tmp_path).name == "cosyvoice2.yaml"
    cfg = load_model_dir_config(tmp_path)
    assert cfg["llm"].kwargs["llm"].kwargs["pretrain_path"] == str(tmp_path / "CosyVoice-BlankEN")


def test_ref_node_dump_is_plain():
    text = dump_upstream_yaml({"a": 2, "b": Ref("<a> * 2")})
    assert "b: !ref <a> * 2" in text and load_upstream_config(text)["b"] == 4


def test_writer_refuses_objects_that_are_not_config_nodes():
    with pytest.raises(UpstreamConfigError, match="cannot write the config as yaml"):
        dump_upstream_yaml({"a": object()})


def test_name_tag_gives_a_partial():
    import functools

    cfg = load_upstream_config("s: !name:cosyvoice.utils.common.ras_sampling\n  top_p: 0.5\n")
    built = builder.Builder("t").build(cfg["s"], "s")
    assert isinstance(built, functools.partial) and built.keywords == {"top_p": 0.5}
    assert built.func is registry.resolve("cosyvoice.utils.common.ras_sampling", "function")


def test_plain_scalars_follow_yaml_1_2_like_upstreams_ruamel_pass():
    # hyperpyyaml reads the file with ruamel (YAML 1.2) first; PyYAML's 1.1 rules would differ on all of these
    cfg = load_upstream_config("a: 1e-06\nb: yes\nc: on\nd: 0o17\ne: 017\nf: 1:30\ng: True\nh: 1_000\nt: (yes, 1e-06)\n")
    assert cfg == {"a": 1e-06, "b": "yes", "c": "on", "d": 15, "e": 17, "f": "1:30", "g": True, "h": 1000,
                   "t": (True, "1e-06")}  # tuple items are read by PyYAML in hyperpyyaml, hence 1.1 there
    assert isinstance(cfg["a"], float) and isinstance(cfg["d"], int)
    # and strings that either rule set would read as something else are written quoted
    strings = {"a": "1e-06", "b": "yes", "d": "0o17", "e": "017", "g": "True", "n": "null", "t": "(1, 2)"}
    assert load_upstream_config(dump_upstream_yaml(strings)) == strings
