import pickle

import pytest
import torch

from hierkern import ScaleLayout
from hierkern.layouts import VAR_256, VAR_512, VAR_1024


def test_var_schedules_lengths():
    assert ScaleLayout(VAR_256).L == 680
    assert ScaleLayout(VAR_512).L == 2240
    assert ScaleLayout(VAR_1024).L == 9451


def test_offsets_and_sizes():
    lay = ScaleLayout((1, 2, 3))
    assert lay.sizes == (1, 4, 9) and lay.offsets == (0, 1, 5, 14) and lay.L == 14
    assert lay.num_scales == 3
    assert ScaleLayout.from_sizes([2, 6, 35]).offsets == (0, 2, 8, 43)


def test_hashable_and_equal():
    a, b = ScaleLayout((1, 2)), ScaleLayout.from_sizes((1, 4))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ScaleLayout((1, 3))
    assert pickle.loads(pickle.dumps(a)) == a


def test_no_device_work_at_construction():
    lay = ScaleLayout(VAR_256)
    assert lay._device_offsets == {}
    t = lay.offsets_tensor("cpu")
    assert t.dtype == torch.int32 and t.tolist() == list(lay.offsets)
    assert lay.offsets_tensor("cpu") is t  # cached


@pytest.mark.parametrize("bad,err", [((), ValueError), ((1, 0), ValueError), ((2, -1), ValueError),
                                     ((1.5,), TypeError), ("12", TypeError), ((True,), TypeError),
                                     (5, TypeError)])
def test_bad_sizes(bad, err):
    with pytest.raises(err, match="ScaleLayout"):
        ScaleLayout.from_sizes(bad)
    with pytest.raises(err, match="ScaleLayout"):
        ScaleLayout(bad)


def test_main_prints_masks(capsys):
    from hierkern.layouts import main
    main()
    out = capsys.readouterr().out
    assert "pattern='causal'" in out and "pattern='diagonal'" in out
