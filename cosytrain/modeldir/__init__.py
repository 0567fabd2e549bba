"""The upstream CosyVoice model-directory format: read it safely, build from it, write it.

One module per job, in the order a model directory is read (``docs/architecture.md``)::

    layout        the file names of a model directory
    errors        ModelDirError, UpstreamConfigError, StateDictMismatchError (one-line messages)
    yaml_nodes    the inert tree a HyperPyYAML config is read into
    yaml_loader   text -> inert tree (a SafeLoader; nothing imported, python tags refused)
    registry      which upstream names cosytrain builds or recognises; every other name is refused
    yaml_resolver overrides, !ref/!copy with safe arithmetic, !include:
    config        finding and reading a config (the steps above, in order)
    yaml_writer   inert tree -> HyperPyYAML that upstream's loader accepts
    builder       inert sections -> cosytrain modules (models/), and the reference fixtures' configs
    generations   v1/v2/v3 from a config's name and classes, or from a state dict's key layout
    weights       torch.load(weights_only=True), cleaning, the one strict state-dict check
    directory     ModelDirectory: an opened model directory (config now, weights when asked)

Other parts of cosytrain import from here (this package's namespace); the modules above import one
another directly, never this ``__init__``.
"""

from cosytrain.modeldir.builder import Builder, build_from_fixture_config, build_parts, fixture_config_to_tree
from cosytrain.modeldir.config import find_config, load_model_dir_config, load_upstream_config
from cosytrain.modeldir.directory import ModelDirectory, load_model_dir, open_model_dir
from cosytrain.modeldir.errors import ModelDirError, StateDictMismatchError, UpstreamConfigError
from cosytrain.modeldir.generations import (
    GENERATION_NAMES,
    PART_CLASS_GENERATIONS,
    config_generation,
    generation_of,
    state_dict_generation,
)
from cosytrain.modeldir.layout import (
    BUILTIN_CAMPPLUS_FILE,
    BUILTIN_FRONT_END_FILES,
    BUILTIN_TOKENIZER_FILE,
    CONFIG_GENERATION,
    CONFIG_NAMES,
    FRONT_END_FILES,
    METADATA_FILE,
    MODEL_CONFIG_NAMES,
    ONNX_CAMPPLUS,
    ONNX_SPEECH_TOKENIZERS,
    PARTS,
    QWEN_DIR,
    SPK2INFO_FILE,
)
from cosytrain.modeldir.weights import check_state_dict, clean_part_state_dict, load_part_state_dict, load_weights_file
from cosytrain.modeldir.yaml_nodes import Apply, Include, Module, Name, New, Placeholder, Ref
from cosytrain.modeldir.yaml_writer import dump_upstream_yaml

__all__ = [
    # errors
    "ModelDirError", "UpstreamConfigError", "StateDictMismatchError",
    # layout and generations
    "PARTS", "CONFIG_NAMES", "MODEL_CONFIG_NAMES", "CONFIG_GENERATION", "ONNX_SPEECH_TOKENIZERS", "ONNX_CAMPPLUS",
    "SPK2INFO_FILE", "FRONT_END_FILES", "BUILTIN_TOKENIZER_FILE", "BUILTIN_CAMPPLUS_FILE", "BUILTIN_FRONT_END_FILES",
    "QWEN_DIR", "METADATA_FILE",
    "GENERATION_NAMES", "PART_CLASS_GENERATIONS", "generation_of", "config_generation", "state_dict_generation",
    # configs
    "New", "Name", "Apply", "Module", "Ref", "Placeholder", "Include",
    "load_upstream_config", "find_config", "load_model_dir_config", "dump_upstream_yaml",
    "Builder", "build_parts", "fixture_config_to_tree", "build_from_fixture_config",
    # weights and the directory
    "load_weights_file", "clean_part_state_dict", "check_state_dict", "load_part_state_dict",
    "ModelDirectory", "open_model_dir", "load_model_dir",
]
