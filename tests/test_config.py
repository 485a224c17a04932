"""``ASVDConfig``: unknown fields raise in direct construction; saved files (this and older versions) load."""

import json

import pytest

import asvd_passes as ap
from asvd_passes.errors import InvalidInputError

# asvd_config.json as main ab2f8c5 wrote it for ASVDConfig(param_ratio=0.7): optimum/transformers keys
# and three fields this version removed (refit_up, svd_dtype, kv_equal_widths).
OLDER_FILE = {
    "allocation": "fisher", "alpha": 0.5, "asvd_statistic": "abs_mean", "calib_samples": 16, "calibration": None,
    "device": "auto", "include_lm_head": False, "kv_allocation": "fisher", "kv_equal_widths": False,
    "kv_group_size": None, "kv_output_metric": True, "kv_ratio": None, "lowrank_form": "pair", "max_memory": None,
    "method": "whiten", "offload_folder": None, "optimum_version": "2.3.0", "output_attentions": False,
    "output_damping": 0.1, "output_whitening": "none", "param_ratio": 0.7, "pipeline": "auto", "ppl_target": None,
    "rank_multiple": 1, "ranks": None, "refit_up": False, "seed": 0, "sensitivity_samples": 4, "seqlen": 512,
    "sequential_calibration": True, "strs_candidates": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "svd_dtype": "float64",
    "transformers_version": "5.24.0",
}


def test_misspelt_field_raises_and_suggests_the_closest():
    with pytest.raises(InvalidInputError, match=r"no field 'param_ration'.*did you mean 'param_ratio'"):
        ap.ASVDConfig(param_ration=0.8)


def test_field_with_no_close_name_lists_the_known_ones():
    with pytest.raises(InvalidInputError, match=r"no field 'zzz'; known fields: allocation, alpha"):
        ap.ASVDConfig(zzz=1)


@pytest.mark.parametrize("name, value", [("refit_up", True), ("svd_dtype", "float32"), ("kv_equal_widths", True)])
def test_removed_field_raises_in_direct_construction(name, value):
    with pytest.raises(InvalidInputError, match=rf"no field '{name}' \(removed"):
        ap.ASVDConfig(**{name: value})


def test_base_class_keys_are_accepted():
    config = ap.ASVDConfig(param_ratio=0.8, transformers_version="5.0.0", optimum_version="2.0.0", output_attentions=False)
    assert config.param_ratio == 0.8


def test_saved_config_round_trips(tmp_path):
    ap.ASVDConfig(param_ratio=0.7, kv_ratio=0.5, allocation="uniform").save_pretrained(tmp_path)
    loaded = ap.ASVDConfig.from_pretrained(tmp_path)
    assert (loaded.param_ratio, loaded.kv_ratio, loaded.allocation) == (0.7, 0.5, "uniform")


def test_older_file_with_removed_fields_loads(tmp_path):
    (tmp_path / ap.ASVDConfig.CONFIG_NAME).write_text(json.dumps(OLDER_FILE))
    loaded = ap.ASVDConfig.from_pretrained(tmp_path)
    assert loaded.param_ratio == 0.7
    assert not any(hasattr(loaded, name) for name in ("refit_up", "svd_dtype", "kv_equal_widths"))


def test_file_with_an_unknown_field_raises(tmp_path):
    (tmp_path / ap.ASVDConfig.CONFIG_NAME).write_text(json.dumps(dict(OLDER_FILE, param_ration=0.8)))
    with pytest.raises(InvalidInputError, match="param_ration"):
        ap.ASVDConfig.from_pretrained(tmp_path)
