from workbench.models import ModelDir


def test_tiny_model_fixture_reads_back(tiny_models):
    for arch in ("llama", "qwen2", "mistral", "gpt2"):
        base, v1 = tiny_models(arch, 2)
        m = ModelDir(base)
        assert m.num_layers == 4
        assert len(m.tensor_names()) > 10
