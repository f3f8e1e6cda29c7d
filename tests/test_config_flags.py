"""On/off options of every bundle config go through ``as_flag``: ``--x false`` from ``monai.bundle run`` is the
string 'false', which plain Python truth reads as on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from ultrarefiner.errors import BadOptionError
from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.options import user_error

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CONFIGS = sorted(p for p in BUNDLES.glob("*/configs/*.json") if p.name != "metadata.json")
OFF_WORDS = ["false", "False", "0", "no", 0, False]
# on/off options that default to an expression rather than a JSON literal
EXPRESSION_FLAGS = {"amp"}


def _bool_keys(bundle: Path) -> set[str]:
    keys = set(EXPRESSION_FLAGS)
    for p in (bundle / "configs").glob("*.json"):
        if p.name == "metadata.json":
            continue
        keys |= {k for k, v in json.loads(p.read_text()).items() if isinstance(v, bool)}
    return keys


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_reference_to_an_on_off_option_goes_through_as_flag(config: Path):
    text = config.read_text()
    keys = _bool_keys(config.parent.parent)
    for key in keys:
        for m in re.finditer(rf"@{key}\b(?![#\w])", text):
            before = text[max(0, m.start() - 40): m.start()]
            assert before.endswith("as_flag("), f"{config}: @{key} used without as_flag: ...{before}@{key}"


@pytest.mark.parametrize("word", OFF_WORDS)
def test_off_words_turn_options_off_in_resolved_configs(word):
    sam = ConfigParser()
    sam.read_config(str(BUNDLES / "sam_refiner" / "configs" / "train.json"))
    sam.update({"use_lora": word, "use_point_prompt": word, "use_mask_prompt": word})
    kwargs = sam.get_parsed_content("refiner_kwargs")
    assert kwargs["use_lora"] is False and kwargs["use_point_prompt"] is False and kwargs["use_mask_prompt"] is False

    ultra = ConfigParser()
    ultra.read_config(str(BUNDLES / "ultrarefiner" / "configs" / "train.json"))
    ultra.update({"use_lora": word})
    assert ultra.get_parsed_content("cache_embeddings") is True  # "not 'false'" was False: no cache with LoRA off
    assert ultra.get_parsed_content("refiner_kwargs")["use_lora"] is False


@pytest.mark.parametrize("word", ["true", "True", "1", "yes", 1, True])
def test_on_words_turn_options_on(word):
    ultra = ConfigParser()
    ultra.read_config(str(BUNDLES / "ultrarefiner" / "configs" / "train.json"))
    ultra.update({"use_lora": word})
    assert ultra.get_parsed_content("cache_embeddings") is False


def test_unknown_words_are_refused_with_the_option_name():
    with pytest.raises(ValueError, match="--use_lora"):
        as_flag("maybe", "use_lora")


@pytest.mark.parametrize(("option", "files", "target"), [
    ("data_source", ["train.json"], "train#dataset"),
    ("val_coarse", ["train.json"], "validate#coarse"),
    ("eval_coarse", ["train.json", "evaluate.json"], "validate#coarse"),
])
def test_a_mistyped_source_names_the_option_and_the_choices(option, files, target):
    """A source name indexes a dict in the sam_refiner configs: without the check a typo is a bare KeyError deep in
    MONAI's expression error; with it, the project's BadOptionError (what the bundle's error hook prints)."""
    parser = ConfigParser()
    parser.read_config([BUNDLES / "sam_refiner" / "configs" / f for f in files])
    parser[option] = "sims"
    parser["datalist"] = "datalist.json"  # resolved as a reference even for disabled datasets; never read here
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(target)
    err = user_error(info.value)
    assert isinstance(err, BadOptionError), info.value
    assert f"--{option}" in str(err) and "'sims'" in str(err) and "simulated" in str(err)
