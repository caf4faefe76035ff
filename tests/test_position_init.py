"""model.position_init: the learned position table of a scratch BERT starts as sines and cosines (or random)."""
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from bertexp.errors import ConfigError
from bertexp.ranges import check_ranges
from conftest import compose


class _Tok:  # what ScratchBert.build reads of a tokenizer
    pad_token_id = 0

    def __len__(self):
        return 64


def _positions(init: str, std: float = 0.08) -> np.ndarray:
    cfg = compose(["model=bert_tiny", f"model.position_init={init}", f"model.initializer_range={std}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).build(_Tok())
    return model.bert.embeddings.position_embeddings.weight.detach().double().numpy()


def test_sinusoidal_table_is_the_transformers_sines_at_the_init_std():
    table = _positions("sinusoidal", std=0.08)
    n, d = table.shape
    # Vaswani et al.: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(the same), here times std*sqrt(2)
    expected = np.zeros((n, d))
    for pos in range(n):
        for i in range(0, d, 2):
            angle = pos / 10000 ** (i / d)
            expected[pos, i], expected[pos, i + 1] = math.sin(angle), math.cos(angle)
    np.testing.assert_allclose(table, expected * 0.08 * math.sqrt(2), atol=1e-6)
    # sin^2 + cos^2 = 1: the entries' root mean square is the std of the rest of the initial weights
    assert np.sqrt((table ** 2).mean()) == pytest.approx(0.08, rel=1e-6)


def test_sinusoidal_rows_are_one_rotation_apart_random_rows_are_not():
    """What the init is for: one fixed linear map (a rotation of each sine/cosine pair by its frequency) takes
    every position's row to its right neighbour's, so attention can learn "look one to the left" once for all
    positions. Random rows have no such map: fitted by least squares on the first 128 positions (the exam's
    length), it fails on positions 200..400, which the fit never saw."""
    p = _positions("sinusoidal")
    d = p.shape[1]
    rotation = np.zeros((d, d))
    for i in range(0, d, 2):
        w = 1 / 10000 ** (i / d)
        rotation[i:i + 2, i:i + 2] = [[math.cos(w), -math.sin(w)], [math.sin(w), math.cos(w)]]
    np.testing.assert_allclose(p[1:], p[:-1] @ rotation, atol=1e-6)
    r = _positions("random")
    fit, *_ = np.linalg.lstsq(r[:127], r[1:128], rcond=None)
    held = r[201:401] - r[200:400] @ fit
    assert np.linalg.norm(held) / np.linalg.norm(r[201:401]) > 0.5


def test_random_is_berts_init():
    table = _positions("random", std=0.08)
    assert table.std() == pytest.approx(0.08, rel=0.05) and abs(table.mean()) < 0.005


def test_unknown_position_init_is_one_line_before_anything_runs():
    with pytest.raises(ConfigError, match=r"model.position_init='sin' must be one of random, sinusoidal"):
        check_ranges(compose(["model.position_init=sin"]))
    from bertexp.modeling import ScratchBert

    with pytest.raises(ConfigError, match=r"model.position_init='sin'"):  # a config not from run.py: checked here
        ScratchBert(position_init="sin")
