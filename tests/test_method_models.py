"""F, T, C and style codes (pft.core.models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pft.core.errors import IncompatibleWeightsError, UnsafeWeightsError
from pft.core.models import (
    Classifier,
    FeatureExtractor,
    ModelConfig,
    StyleNormalizer,
    Translator,
    param_count,
    preprocess,
    raw_style_code,
    style_code,
)
from pft.core.safe_weights import save_safetensors

# The 122 entries of torchvision.models.resnet18().state_dict(), written out by hand
# (torchvision is not installable here): 102 parameters/buffers + 20 num_batches_tracked.
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.weight",
    "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var",
    "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight",
    "layer1.0.bn2.weight",
    "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean",
    "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight",
    "layer1.1.bn1.weight",
    "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var",
    "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight",
    "layer1.1.bn2.weight",
    "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean",
    "layer1.1.bn2.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight",
    "layer2.0.bn1.weight",
    "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var",
    "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight",
    "layer2.0.bn2.weight",
    "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean",
    "layer2.0.bn2.running_var",
    "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean",
    "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked",
    "layer2.1.conv1.weight",
    "layer2.1.bn1.weight",
    "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean",
    "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight",
    "layer2.1.bn2.weight",
    "layer2.1.bn2.bias",
    "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight",
    "layer3.0.bn1.weight",
    "layer3.0.bn1.bias",
    "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked",
    "layer3.0.conv2.weight",
    "layer3.0.bn2.weight",
    "layer3.0.bn2.bias",
    "layer3.0.bn2.running_mean",
    "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked",
    "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked",
    "layer3.1.conv1.weight",
    "layer3.1.bn1.weight",
    "layer3.1.bn1.bias",
    "layer3.1.bn1.running_mean",
    "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked",
    "layer3.1.conv2.weight",
    "layer3.1.bn2.weight",
    "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean",
    "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight",
    "layer4.0.bn1.weight",
    "layer4.0.bn1.bias",
    "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked",
    "layer4.0.conv2.weight",
    "layer4.0.bn2.weight",
    "layer4.0.bn2.bias",
    "layer4.0.bn2.running_mean",
    "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked",
    "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean",
    "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.conv1.weight",
    "layer4.1.bn1.weight",
    "layer4.1.bn1.bias",
    "layer4.1.bn1.running_mean",
    "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked",
    "layer4.1.conv2.weight",
    "layer4.1.bn2.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
    "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked",
    "fc.weight",
    "fc.bias",
]


def test_torchvision_key_list_is_the_resnet18_one() -> None:
    assert len(TORCHVISION_RESNET18_KEYS) == 122
    assert len(set(TORCHVISION_RESNET18_KEYS)) == 122


@pytest.mark.parametrize("width", [8, 16])
def test_feature_extractor_keys_are_torchvision_resnet18_without_fc(width: int) -> None:
    keys = set(FeatureExtractor(ModelConfig(width=width)).state_dict())
    assert keys == {k for k in TORCHVISION_RESNET18_KEYS if not k.startswith("fc.")}


def test_embed_only_when_feature_dim_differs() -> None:
    f = FeatureExtractor(ModelConfig(width=16, feature_dim=64))
    assert f.embed is not None
    assert f(torch.zeros(2, 3, 64, 64)).shape == (2, 64)
    assert FeatureExtractor(ModelConfig(width=16, feature_dim=128)).embed is None


@pytest.mark.parametrize("bad", [{"feature_dim": 32}, {"feature_dim": 1024}, {"width": 4}, {"taps": ("fc",)}])
def test_model_config_rejects_bad_sizes(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_shapes_taps_and_frame_statistics_match_a_direct_computation() -> None:
    cfg = ModelConfig(width=8, taps=("layer2", "layer4"))
    fx = FeatureExtractor(cfg).eval()
    x = torch.randn(3, 3, 64, 64)
    f, taps = fx.forward_taps(x)
    assert f.shape == (3, 64) and set(taps) == {"layer2", "layer4"}
    assert taps["layer2"].shape == (3, 16, 8, 8) and taps["layer4"].shape == (3, 64, 2, 2)
    stats = fx.frame_statistics(x)
    assert stats.shape == (3, cfg.stats_dim) == (3, 2 * (16 + 64))
    m2 = taps["layer2"].mean(dim=(2, 3))
    q4 = (taps["layer4"] ** 2).mean(dim=(2, 3))
    torch.testing.assert_close(stats[:, :16], m2)
    torch.testing.assert_close(stats[:, 80 + 16 :], q4)
    torch.testing.assert_close(fx(x), f)


def test_style_code_is_exact_mean_and_std_over_all_frames_and_positions() -> None:
    cfg = ModelConfig(width=8, taps=("layer1",))
    fx = FeatureExtractor(cfg).eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        f, taps = fx.forward_taps(x)
        stats = fx.frame_statistics(x)
    code = raw_style_code(f, stats)
    assert code.shape == (cfg.style_dim,)
    t = taps["layer1"].double()  # (5, 8, 16, 16): statistics over frames AND positions
    mu = t.mean(dim=(0, 2, 3))
    sigma = torch.sqrt(t.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    d = cfg.pooled_dim
    torch.testing.assert_close(code[:d], f.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(code[d : 2 * d], torch.sqrt(f.var(0, unbiased=False) + 1e-5))
    torch.testing.assert_close(code[2 * d : 2 * d + 8].double(), mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(code[2 * d + 8 :].double(), sigma, atol=1e-4, rtol=1e-3)


def test_style_normalizer_z_scores_with_source_statistics() -> None:
    codes = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    norm = StyleNormalizer.fit(codes)
    out = norm(torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0]))
    # a constant dimension keeps a floor std instead of dividing by zero
    assert float(norm.std[1]) == pytest.approx(1e-3)
    f = torch.randn(4, 64)
    stats = torch.rand(4, 2 * 8)
    stats[:, 8:] += stats[:, :8] ** 2
    raw = raw_style_code(f, stats)
    n2 = StyleNormalizer(raw.numel())
    n2.mean.fill_(1.0)
    torch.testing.assert_close(style_code(f, stats, n2), raw - 1.0)


def test_translator_starts_as_identity_is_small_and_accepts_both_style_shapes() -> None:
    cfg = ModelConfig(width=16)
    t = Translator(cfg).eval()
    assert 100_000 <= t.param_count() <= 200_000
    f = torch.randn(6, 128)
    s1, s2 = torch.randn(cfg.style_dim), torch.randn(cfg.style_dim)
    torch.testing.assert_close(t(f, s1, s2), f)
    torch.nn.init.normal_(t.out.weight, std=0.1)
    batched = t(f, s1.expand(6, -1), s2.expand(6, -1))
    torch.testing.assert_close(t(f, s1, s2), batched)
    assert not torch.allclose(batched, f)
    # styles change the output: T is conditioned on them
    assert not torch.allclose(t(f, s1, s2), t(f, s2, s1))


def test_last_layers_parameters_select_the_output_side() -> None:
    t = Translator(ModelConfig(width=16))
    last1 = t.last_layers_parameters(1)
    assert [p.shape for p in last1] == [t.out.weight.shape, t.out.bias.shape]
    assert len(t.last_layers_parameters(None)) == len(list(t.parameters()))


def _perturbed_translator(seed: int, cfg: ModelConfig) -> Translator:
    torch.manual_seed(seed)
    t = Translator(cfg).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past the identity start, LayerNorm not the identity
    return t


def test_translator_layout_is_what_it_is_built_with() -> None:
    cfg = ModelConfig(width=8, translator_hidden=32, translator_blocks=3, style_embed_dim=4, dropout=0.2)
    layout = Translator(cfg).layout()
    assert (layout.feature_dim, layout.style_dim, layout.style_embed_dim) == (64, cfg.style_dim, 4)
    assert layout.hidden == (32, 32, 32) and layout.dropout == (0.2, 0.2, 0.2)
    assert layout.norm_eps == 1e-5


@pytest.mark.parametrize("stacked", [[], ["out.bias"], ["out.weight", "out.bias"], None])
def test_stacked_forward_equals_each_persons_own_forward(stacked: list[str] | None) -> None:
    # S persons, each with its own copy of the tensors named in ``stacked`` (None: all of T)
    cfg = ModelConfig(width=8, translator_hidden=32, style_embed_dim=8)
    persons = [_perturbed_translator(k, cfg) for k in range(3)]
    shared = persons[0].tensors()
    names = list(shared) if stacked is None else stacked
    for t in persons[1:]:  # persons share every tensor not named
        own = dict(t.named_parameters())
        with torch.no_grad():
            for n, v in shared.items():
                if n not in names:
                    own[n].copy_(v)
    tensors = {**shared, **{n: torch.stack([t.tensors()[n] for t in persons]) for n in names}}
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 5, cfg.pooled_dim, generator=g)
    s_from, s_to = torch.randn(3, cfg.style_dim, generator=g), torch.randn(3, cfg.style_dim, generator=g)
    base = persons[0]
    out = base.stacked_forward(
        tensors, f, base.stacked_embed(tensors, s_from), base.stacked_embed(tensors, s_to)
    )
    for k, t in enumerate(persons):
        torch.testing.assert_close(out[k], t(f[k], s_from[k], s_to[k]), atol=1e-5, rtol=1e-5)


def test_frozen_prefix_plus_the_output_bias_is_t() -> None:
    cfg = ModelConfig(width=8, translator_hidden=32, translator_blocks=3, style_embed_dim=8)
    t = _perturbed_translator(0, cfg)
    prefix = t.frozen_prefix()
    g = torch.Generator().manual_seed(2)
    f = torch.randn(7, cfg.pooled_dim, generator=g)
    s_from, s_to = torch.randn(cfg.style_dim, generator=g), torch.randn(cfg.style_dim, generator=g)
    normed = torch.nn.functional.layer_norm(
        f, (cfg.pooled_dim,), prefix.norm_weight, prefix.norm_bias, prefix.norm_eps
    )
    h = torch.nn.functional.gelu(normed @ prefix.first_frame.T + prefix.style_rows(s_from, s_to))
    for w, b in prefix.hidden:
        h = torch.nn.functional.gelu(h @ w.T + b)
    rebuilt = f + h @ prefix.out_weight.T + t.tensors()[Translator.OUTPUT_BIAS]
    torch.testing.assert_close(rebuilt, t(f, s_from, s_to).detach(), atol=1e-5, rtol=1e-5)
    assert len(prefix.hidden) == 2 and prefix.dropout == t.layout().dropout


def test_classifier_linear_map_is_c_in_eval_mode() -> None:
    c = Classifier(ModelConfig(width=8, num_classes=3)).eval()
    w, b = c.linear_map()
    f = torch.randn(4, 64)
    torch.testing.assert_close(f @ w.T + b, c(f).detach())


def test_classifier_shape_and_param_count() -> None:
    c = Classifier(ModelConfig(width=16, num_classes=3)).eval()
    assert c(torch.randn(2, 128)).shape == (2, 3)
    assert param_count(c) == 128 * 3 + 3


def test_preprocess_scales_to_unit_range_and_resizes() -> None:
    crops = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    crops[1] = 255
    x = preprocess(crops, image_size=64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert float(x[0].max()) == -1.0 and float(x[1].min()) == 1.0
    same = preprocess(torch.full((1, 64, 64, 3), 128, dtype=torch.uint8))
    torch.testing.assert_close(same, torch.full((1, 3, 64, 64), 128 / 127.5 - 1))
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_load_torchvision_weights_round_trip_and_clear_errors(tmp_path: Path) -> None:
    cfg = ModelConfig(width=64)
    source = FeatureExtractor(cfg)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = save_safetensors(state, tmp_path / "resnet18.safetensors")
    target = FeatureExtractor(cfg)
    target.load_torchvision_weights(path)
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    with pytest.raises(IncompatibleWeightsError, match="width=64"):
        FeatureExtractor(ModelConfig(width=16)).load_torchvision_weights(path)
    bad = dict(state)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(IncompatibleWeightsError, match=r"layer1\.0\.conv1\.weight has shape"):
        target.load_torchvision_weights(save_safetensors(bad, tmp_path / "bad.safetensors"))
    del bad["layer1.0.conv1.weight"]
    with pytest.raises(IncompatibleWeightsError, match="missing keys"):
        target.load_torchvision_weights(save_safetensors(bad, tmp_path / "missing.safetensors"))
    pickle_path = tmp_path / "pickle.safetensors"
    torch.save(state, pickle_path)
    with pytest.raises(UnsafeWeightsError):
        target.load_torchvision_weights(pickle_path)
