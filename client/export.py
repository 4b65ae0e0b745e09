"""One personalised model for mobile runtimes: F, T and C fused into a single ``nn.Module``.

:class:`PersonalizedModel` takes a batch of RGB face crops, channels last, ``(N, S, S, 3)`` with
``S`` the bundle's ``image_size``, either ``uint8`` or ``float32`` on the same 0..255 scale, and
returns class probabilities ``(N, K)``. It scales the crops exactly like
:func:`pft.core.models.preprocess` (``x / 127.5 - 1``), runs ``C(T(F(x), s_target, s_reference))``
(or ``C(F(x))`` before enrollment) and applies a softmax. The two style codes are buffers, so the
exported file needs nothing else.

:func:`export_model` writes it as ONNX (legacy TorchScript-based exporter, opset 17, dynamic
batch, class names and the bundle digest in the model's metadata) or TorchScript (traced, same
information in the extra file ``pft.json``). Files are written to a temporary name beside the
target and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pft.core.models import Classifier, FeatureExtractor, Translator

__all__ = ["ExportFormat", "InputDType", "PersonalizedModel", "export_model"]

ExportFormat = Literal["onnx", "torchscript"]
InputDType = Literal["uint8", "float32"]
ONNX_OPSET = 17


class PersonalizedModel(nn.Module):
    """``softmax(C(T(F(x), s_target, s_reference)))`` on channels-last face crops, in eval mode.

    Parameters
    ----------
    extractor, classifier:
        F and C of the bundle (copied; the originals are not touched).
    translator, style_target, style_reference:
        The person's adapted T and style codes; all three ``None`` gives the source model ``C(F(x))``.
    """

    style_target: Tensor
    style_reference: Tensor

    def __init__(
        self,
        extractor: FeatureExtractor,
        classifier: Classifier,
        translator: Translator | None = None,
        style_target: Tensor | None = None,
        style_reference: Tensor | None = None,
    ) -> None:
        super().__init__()
        given = [translator is not None, style_target is not None, style_reference is not None]
        if any(given) and not all(given):
            raise ValueError("a translator needs both style codes (or give none of the three)")
        self.extractor = copy.deepcopy(extractor)
        self.classifier = copy.deepcopy(classifier)
        self.translator = copy.deepcopy(translator) if translator is not None else None
        self.image_size = extractor.config.image_size
        dim = extractor.config.style_dim
        self.register_buffer(
            "style_target", (style_target if style_target is not None else torch.zeros(dim)).detach().clone()
        )
        self.register_buffer(
            "style_reference",
            (style_reference if style_reference is not None else torch.zeros(dim)).detach().clone(),
        )
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def personalized(self) -> bool:
        """Whether T is part of the model."""
        return self.translator is not None

    def forward(self, images: Tensor) -> Tensor:
        """Probabilities (N, K) of RGB crops (N, S, S, 3), uint8 or float on the 0..255 scale."""
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        f = self.extractor(x)
        if self.translator is not None:
            f = self.translator(f, self.style_target, self.style_reference)
        return torch.softmax(self.classifier(f), dim=1)

    def example_input(self, batch: int = 2, dtype: InputDType = "uint8") -> Tensor:
        """A deterministic example batch of the input shape and dtype (for tracing)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, self.image_size, self.image_size, 3), generator=gen)
        return x.to(torch.uint8 if dtype == "uint8" else torch.float32)


@contextlib.contextmanager
def _staged(path: Path) -> Any:
    """A temporary file beside ``path`` that replaces it on success and is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def export_model(
    model: PersonalizedModel,
    path: str | Path,
    format: ExportFormat = "onnx",
    *,
    input_dtype: InputDType = "uint8",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an ONNX or TorchScript file for a mobile runtime.

    Parameters
    ----------
    model:
        The fused model.
    path:
        Output file (parent folders are created).
    format:
        ``"onnx"`` (input ``images``, output ``probabilities``, dynamic batch) or ``"torchscript"``.
    input_dtype:
        The dtype the exported graph takes: ``uint8`` or ``float32`` (0..255 scale).
    metadata:
        JSON-able values stored with the model (ONNX ``metadata_props`` as JSON strings; the
        TorchScript extra file ``pft.json``).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    model.eval()
    example = model.example_input(2, input_dtype)
    info = {"input": f"{input_dtype} (N, {model.image_size}, {model.image_size}, 3) RGB, 0..255"}
    info.update(metadata or {})
    with _staged(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # both exporters are deprecated upstream but still supported
        if format == "onnx":
            import onnx

            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
            proto = onnx.load(str(tmp))
            for key, value in info.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = f"pft.{key}", json.dumps(value)
            onnx.save(proto, str(tmp))
        elif format == "torchscript":
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={"pft.json": json.dumps(info, sort_keys=True)})
        else:
            raise ValueError(f"unknown export format {format!r}; use 'onnx' or 'torchscript'")
    return path
