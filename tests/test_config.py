import pytest

from xbraid_transformers import MGRITConfig


def test_defaults_and_per_level_values():
    cfg = MGRITConfig(levels=3, cfactor=[4, 2], relax=["F", "FCFCF"])
    assert cfg.cfactors == (4, 2)
    assert cfg.cf_sweeps == (0, 2)
    assert cfg.coarsest_spacing == 8
    assert MGRITConfig(levels=1).coarsest_spacing == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=0), "levels"),
    (dict(cfactor=1), "cfactor"),
    (dict(levels=3, cfactor=[2]), "levels - 1"),
    (dict(relax="CF"), "relax"),
    (dict(relax="FF"), "relax"),
    (dict(cycle="W"), "cycle"),
    (dict(fwd_iters=-1), "fwd_iters"),
    (dict(bwd_iters=1.5), "bwd_iters"),
    (dict(tol=-1.0), "tol"),
    (dict(initial_guess="random"), "initial_guess"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MGRITConfig(**kwargs)
