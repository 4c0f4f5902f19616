"""The main job end to end on the real default model (prepared by `make test` before the suite)."""

import pytest

from workbench.models.default_model import default_dir_for, is_complete


@pytest.mark.skipif(not is_complete(default_dir_for("float32")), reason="default model not prepared")
def test_demo_merges_the_default_model_and_it_still_answers(capsys):
    from workbench.demo import run_demo
    from workbench.home import workbench_home
    from workbench.models import ModelDir

    assert run_demo() == 0
    out = capsys.readouterr()
    merged = workbench_home() / "merges" / "demo-ties"
    assert out.out.strip() == str(merged)
    assert "Paris" in out.err
    with ModelDir(merged) as m, ModelDir(default_dir_for("float32")) as base:
        assert m.tensor_names() == base.tensor_names()
        name = "model.layers.3.mlp.up_proj.weight"
        assert not m.get_tensor(name).equal(base.get_tensor(name))  # it really merged the variants
