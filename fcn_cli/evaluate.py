"""`fcn evaluate`: score a checkpoint on a split, at each annotation's own resolution.

Every photo of the split runs through the model (``inference``: resized to the training size or
at native size); its logits come back to the photo's size -- labels are never resized -- and the
argmax is counted against the annotation into ONE confusion matrix for the whole split, void
pixels ignored. Every metric comes from that matrix (``metrics.scores``).

Files: ``json_path`` (default ``eval-<split>.json`` in the checkpoint's own folder, following the
``models/<variant>.keras`` link to its run folder) with every number, and beside it
``<stem>_confusion.csv`` (raw counts) and ``<stem>_confusion.png`` (row-normalised heatmap).
"""

from __future__ import annotations

import time
from pathlib import Path

from fcn_cli.errors import FcnError, write_error

SCHEMA = "fcn.evaluate/1"  # the report's layout; bumped when a key changes meaning or goes away


def output_paths(model_path: str | Path, split: str, json_path: str | Path | None) -> dict[str, Path]:
    """The JSON, confusion CSV and confusion PNG paths of an evaluation."""
    if json_path is None:
        json_path = Path(model_path).resolve().parent / f"eval-{split}.json"
    json_path = Path(json_path)
    stem = json_path.stem if json_path.suffix else json_path.name
    return {
        "json": json_path,
        "confusion_csv": json_path.with_name(f"{stem}_confusion.csv"),
        "confusion_png": json_path.with_name(f"{stem}_confusion.png"),
    }


def _check_writable(files: dict[str, Path], given: bool) -> None:
    folder = files["json"].parent
    hint = "choose another --out path" if given else "pass --out PATH to write the report elsewhere"
    if files["json"].is_dir():
        raise FcnError(f"{files['json']}: is a folder; give a file name for the JSON report")
    from fcn_cli.runs import ensure_writable_folder

    ensure_writable_folder(folder, "report folder", hint)


def evaluate(
    model_path,
    data_dir,
    split: str = "val",
    classes_file=None,
    json_path=None,
    mode: str = "resize",
    batch_size: int = 4,
    console=None,
    image_size=None,
    **inference_options,
) -> dict:
    """Score ``model_path`` on ``split`` of ``data_dir``; print the table, write the files, return every number.

    The returned dict (also the JSON) holds schema (``SCHEMA``), pixel_accuracy, mean_accuracy,
    mean_iou, mean_dice, fw_iou, pixels, per_class (name, colour, iou, accuracy, dice, support),
    confusion_matrix, split, checkpoint, images, mode, tta ({"scales": [...], "flip": bool}) and files.
    ``image_size`` (H, W) overrides the checkpoint's inference size in resize mode.
    ``inference_options`` (tile, overlap, tile_budget, flip, scales) go to
    :func:`fcn_cli.inference.iter_predictions`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fcn_cli import metrics
    from fcn_cli.datasets import find_dataset
    from fcn_cli.inference import effective_mode, iter_predictions, load_for_inference, prefetch, tta_scales
    from fcn_cli.pipeline import evaluation_items
    from fcn_cli.runs import write_json

    console = console or Console()
    # Checked before any data or model is read; the report records the scales as they ran.
    tta = {"scales": list(tta_scales(inference_options.get("scales"))), "flip": bool(inference_options.get("flip"))}
    inference_options = {**inference_options, "scales": tuple(tta["scales"]), "flip": tta["flip"]}
    model_path = Path(model_path)
    files = output_paths(model_path, split, json_path)
    from fcn_cli import shards

    if shards.is_shard_folder(Path(data_dir)):
        shard_set = shards.ShardSet.open(Path(data_dir))
        total = shard_set.count(split)
        source = ((n.decode(), img, lab) for img, lab, n, _, _ in shards.records(shard_set.files(split)).as_numpy_iterator())
    else:
        pairs = find_dataset(data_dir).pairs(split)
        total = len(pairs)
        source = None
    model, classes, recorded_size, meta = load_for_inference(model_path, classes_file)
    used, size = effective_mode(mode, image_size or recorded_size)
    if used != mode:
        console.print(f"{model_path}: the checkpoint records no training size; evaluating in native mode",
                      highlight=False)
    _check_writable(files, given=json_path is not None)

    cm = metrics.ConfusionMatrix(classes.num_classes, classes.ignore_index)
    started = time.perf_counter()
    if source is None:
        source = evaluation_items(pairs, classes)
    items = (((name, label), image) for name, image, label in source)
    progress = Progress(
        TextColumn(f"evaluate {split}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    count = 0
    with progress:
        task = progress.add_task("evaluate", total=total)
        for (_name, label), predicted in iter_predictions(
            model, prefetch(items, depth=2 * max(1, batch_size)), used, size, batch_size, output="labels",
            **inference_options,
        ):
            cm.update(label, predicted)
            count += 1
            progress.advance(task)
    seconds = time.perf_counter() - started

    summary = cm.scores()
    matrix = cm.matrix
    per_class = [
        {"index": i, "name": name, "color": list(colour), "ignored": i == classes.ignore_index, **entry}
        for i, (name, colour, entry) in enumerate(zip(classes.names, classes.colors, summary["per_class"]))
    ]
    result = {
        "schema": SCHEMA,
        "checkpoint": str(model_path),
        "checkpoint_resolved": str(model_path.resolve()),
        "data": str(data_dir),
        "split": split,
        "images": count,
        "mode": used,
        "tta": tta,
        "image_size": list(size) if size else None,
        "variant": meta.get("variant"),
        "pixel_accuracy": summary["pixel_accuracy"],
        "mean_accuracy": summary["mean_accuracy"],
        "mean_iou": summary["mean_iou"],
        "mean_dice": summary["mean_dice"],
        "fw_iou": summary["fw_iou"],
        "pixels": summary["pixels"],
        "ignore_index": classes.ignore_index,
        "ignored_class": None if classes.ignore_index is None else classes.names[classes.ignore_index],
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 3) if seconds > 0 else None,
        "files": {k: str(v) for k, v in files.items()},
    }
    for key, write in (("confusion_csv", metrics.write_confusion_csv), ("confusion_png", metrics.plot_confusion)):
        try:
            write(matrix, classes.names, files[key])
        except OSError as exc:  # the line names the file that failed, not always the first
            raise write_error(files[key], exc, "choose another --out path") from None
    write_json(files["json"], result)

    console.print(metrics.metrics_table(summary, classes.names, classes.ignore_index))
    console.print(
        f"{split}: {count} images, {summary['pixels']:,} pixels at native resolution ({used} mode), "
        f"mean IoU {_fmt(summary['mean_iou'])}, pixel accuracy {_fmt(summary['pixel_accuracy'])}; "
        f"report {files['json']}",
        highlight=False,
    )
    return result


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"
