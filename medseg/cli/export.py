"""``medseg export``: a model folder's network as ONNX, for onnxruntime and other runtimes."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.app import app, check_output_file, help_text


@app.command(
    help=help_text(
        "Export a model folder's network as ONNX with a free tile size.",
        "The graph is the inference network (batch norm folded into the convolutions, "
        "float32): input 'image' (N, C, *tile), output 'logits' (N, classes, *tile - 2 * "
        "margin), batch and every spatial size free, so overlap-tile inference runs it at any "
        "valid tile size. The plan's network settings and the margin are stored in the file's "
        "metadata. After writing, one random tile is run through torch and onnxruntime and "
        "the largest difference is printed as a fraction of the logits' range.",
        "medseg infer --engine onnxruntime runs the same exact overlap-tile inference on it "
        "(MODEL/model.onnx by default, else --onnx).",
        "Examples:\n\n"
        "  medseg export --model runs/ct\n\n"
        "  medseg export --model runs/ct --onnx model.onnx",
    )
)
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (training run)."),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="ONNX file to write (default MODEL/model.onnx)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    from medseg.inference.engine import engine_agreement
    from medseg.inference.model_folder import load_model
    from medseg.model.export import export_onnx

    out = onnx if onnx is not None else model / "model.onnx"
    check_output_file(out, overwrite)
    loaded = load_model(model, "cpu")
    export_onnx(loaded.model, out)  # type: ignore[arg-type]
    diff, size = engine_agreement(loaded.model, out)
    tile = " x ".join(map(str, size))
    print(
        f"wrote {out}: onnxruntime logits within {diff:.1e} of the torch logits' range "
        f"(random {tile} tile)"
    )
