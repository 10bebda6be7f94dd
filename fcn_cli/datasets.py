"""Data sets on disk: layout detection, image/mask pairing, `fcn data check`, class statistics.

Three layouts are recognised, first match wins:

* SegNet: ``train/ trainannot/ val/ valannot/ test/ testannot/`` (any subset of the splits).
* Keras tutorial: ``images_prepped_train/ annotations_prepped_train/`` and ``..._test`` (``..._val``
  too if present; without it the test split also serves as ``val``).
* generic: ``images/`` + ``masks/``, split by sub-folders (``images/train`` + ``masks/train`` ...),
  by list files at the root (``train.txt``, ``val.txt``, ``test.txt``: one image stem or relative
  path a line) or not at all (everything is ``train``).

An image pairs with the mask of the same relative path minus extension (``a.jpg`` <-> ``a.png``);
the mask may also carry a suffix such as ``_mask``, ``_label`` or ``_L`` (CamVid's colour labels).
Folders are searched recursively; hidden files are ignored; every order is sorted.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from fcn_cli.classes import ClassTable
from fcn_cli.errors import FcnError
from fcn_cli.images import IMAGE_SUFFIXES, image_size, read_image, read_mask

SPLITS = ("train", "val", "test")
MASK_FOLDERS = ("masks", "annotations", "labels")
# Tried in order after the exact name; "_L" is the CamVid colour-label convention (0001TP_006690_L.png).
MASK_NAME_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_L", "_gt", "_annot")
LAYOUTS_HELP = (
    "expected train/ + trainannot/ (SegNet), images_prepped_train/ + annotations_prepped_train/ "
    "or images/ + masks/; run `fcn data synthetic DIR` or `fcn data download camvid` to get a data set"
)


@dataclass(frozen=True)
class Pair:
    """One photo and its annotation. ``name`` is the photo's path relative to its split folder."""

    image: Path
    mask: Path
    name: str


@dataclass
class Problem:
    """Something wrong with one file. ``split`` says which split it blocks (None: no split uses the file)."""

    path: Path
    message: str
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Dataset:
    root: Path
    layout: str  # "segnet" | "prepped" | "generic"
    splits: dict[str, list[Pair]]  # only splits with at least one pair, in SPLITS order
    problems: list[Problem] = field(default_factory=list)  # pairing problems found while scanning

    def pairs(self, split: str) -> list[Pair]:
        found = self.splits.get(split)
        if not found:
            raise FcnError(f"{self.root}: no '{split}' split; found: {', '.join(self.splits) or 'none'}")
        return found


# --------------------------------------------------------------------------- finding a data set


def find_dataset(root: str | Path) -> Dataset:
    """The data set under ``root``, its layout detected. FcnError when there is none."""
    root = Path(root)
    if not root.exists():
        raise FcnError(f"{root}: folder not found; {LAYOUTS_HELP}")
    if not root.is_dir():
        raise FcnError(f"{root}: is a file, expected a data set folder; {LAYOUTS_HELP}")
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        raise FcnError(f"{root}: folder is empty; {LAYOUTS_HELP}")
    for detect in (_segnet_dataset, _prepped_dataset, _generic_dataset):
        dataset = detect(root)
        if dataset is None:
            continue
        if not dataset.splits and not dataset.problems:
            raise FcnError(f"{root}: {dataset.layout} layout but no image files in it; {LAYOUTS_HELP}")
        return dataset
    shown = ", ".join(e + ("/" if (root / e).is_dir() else "") for e in entries[:6])
    more = f" and {len(entries) - 6} more" if len(entries) > 6 else ""
    raise FcnError(f"{root}: no data set layout recognised (found {shown}{more}); {LAYOUTS_HELP}")


def _segnet_dataset(root: Path) -> Dataset | None:
    folders = {split: (root / split, root / f"{split}annot") for split in SPLITS}
    return _folder_pairs_dataset(root, "segnet", folders)


def _prepped_dataset(root: Path) -> Dataset | None:
    folders = {
        split: (root / f"images_prepped_{split}", root / f"annotations_prepped_{split}") for split in SPLITS
    }
    dataset = _folder_pairs_dataset(root, "prepped", folders)
    if dataset is not None and "val" not in dataset.splits and "test" in dataset.splits:
        # The tutorial has no validation split and validates on its test split; do the same.
        splits = {**dataset.splits, "val": dataset.splits["test"]}
        dataset.splits = {split: splits[split] for split in SPLITS if split in splits}
    return dataset


def _generic_dataset(root: Path) -> Dataset | None:
    image_dir = root / "images"
    mask_dir = next((root / m for m in MASK_FOLDERS if (root / m).is_dir()), None)
    if not image_dir.is_dir() or mask_dir is None:
        return None
    if any((image_dir / split).is_dir() for split in SPLITS):
        folders = {split: (image_dir / split, mask_dir / split) for split in SPLITS}
        return _folder_pairs_dataset(root, "generic", folders)
    pairs, problems = _pair_folder(root, image_dir, mask_dir, split=None)
    if any((root / f"{split}.txt").is_file() for split in SPLITS):
        splits = _listed_splits(root, image_dir, pairs, problems)
    else:
        for problem in problems:
            problem.split = "train"
        splits = {"train": pairs}
    return Dataset(root, "generic", {s: p for s, p in splits.items() if p}, problems)


def _folder_pairs_dataset(root: Path, layout: str, folders: dict[str, tuple[Path, Path]]) -> Dataset | None:
    """Splits from (image folder, mask folder) per split; None when no split has both folders."""
    if not any(images.is_dir() and masks.is_dir() for images, masks in folders.values()):
        return None
    splits: dict[str, list[Pair]] = {}
    problems: list[Problem] = []
    for split, (image_dir, mask_dir) in folders.items():
        if image_dir.is_dir() and mask_dir.is_dir():
            pairs, found = _pair_folder(root, image_dir, mask_dir, split)
            problems += found
            if pairs:
                splits[split] = pairs
        elif image_dir.is_dir() or mask_dir.is_dir():
            have, missing = (image_dir, mask_dir) if image_dir.is_dir() else (mask_dir, image_dir)
            message = f"no {_shown(root, missing, folder=True)} folder beside it; split '{split}' is unused"
            problems.append(Problem(have, message, split))
    return Dataset(root, layout, splits, problems)


def _listed_splits(root: Path, image_dir: Path, pairs: list[Pair], problems: list[Problem]) -> dict[str, list[Pair]]:
    """Splits named by train.txt / val.txt / test.txt; a listed image without a mask blocks its split."""
    pair_by_key = {_stem_key(p.name): p for p in pairs}
    unpaired = {p.path: p for p in problems}
    image_by_key = {_stem_key(rel): path for rel, path in _image_files(image_dir).items()}
    splits: dict[str, list[Pair]] = {}
    for split in SPLITS:
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        chosen: list[Pair] = []
        for number, entry in _list_entries(listing):
            key = _entry_key(entry)
            if key in pair_by_key:
                chosen.append(pair_by_key[key])
            elif key in image_by_key and image_by_key[key] in unpaired:
                unpaired[image_by_key[key]].split = split
            else:
                problems.append(Problem(listing, f"line {number}: no image {entry!r} under images/", split))
        splits[split] = list(dict.fromkeys(chosen))
    return splits


def _list_entries(listing: Path) -> Iterable[tuple[int, str]]:
    try:
        lines = listing.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise FcnError(f"{listing}: cannot read split list ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield number, entry


def _entry_key(entry: str) -> str:
    """'images/sub/a.jpg', 'sub/a.jpg' and 'sub/a' all name the image key 'sub/a'."""
    path = PurePosixPath(entry.replace("\\", "/"))
    if path.parts and path.parts[0] == "images":
        path = PurePosixPath(*path.parts[1:])
    return _stem_key(path.as_posix())


# --------------------------------------------------------------------------- pairing


def _pair_folder(root: Path, image_dir: Path, mask_dir: Path, split: str | None) -> tuple[list[Pair], list[Problem]]:
    """Pairs of the images under ``image_dir`` with the masks under ``mask_dir``, and what did not pair."""
    images = _image_files(image_dir)
    masks = _image_files(mask_dir)
    problems: list[Problem] = []
    image_by_key: dict[str, str] = {}
    for rel, path in images.items():
        key = _stem_key(rel)
        if key in image_by_key:
            problems.append(Problem(path, f"another image has the same name ({image_by_key[key]}); rename one", split))
        else:
            image_by_key[key] = rel
    mask_by_key, mask_problems = _masks_by_image_key(masks, image_by_key, _shown(root, image_dir, folder=True), split)
    problems += mask_problems
    pairs = []
    for key, rel in image_by_key.items():
        if key in mask_by_key:
            pairs.append(Pair(images[rel], mask_by_key[key], rel))
        else:
            expected = _shown(root, mask_dir / f"{key}.png")
            message = f"no mask (expected {expected}); add the mask or remove the image"
            problems.append(Problem(images[rel], message, split))
    problems.sort(key=lambda p: str(p.path))
    return pairs, problems


def _masks_by_image_key(
    masks: dict[str, Path], image_by_key: dict[str, str], image_dir: str, split: str | None
) -> tuple[dict[str, Path], list[Problem]]:
    by_key: dict[str, Path] = {}
    problems: list[Problem] = []
    # Exact names first, so 'a.png' wins over 'a_L.png' when both are there.
    ranked = sorted(masks.items(), key=lambda item: (_stem_key(item[0]) not in image_by_key, item[0]))
    for rel, path in ranked:
        key = _image_key_of_mask(_stem_key(rel), image_by_key)
        if key is None:
            message = f"no image for this mask in {image_dir}; add the image or remove the mask"
            problems.append(Problem(path, message, split))
        elif key in by_key:
            problems.append(
                Problem(path, f"second mask for {image_by_key[key]} ({by_key[key].name} is used); remove one", split)
            )
        else:
            by_key[key] = path
    return by_key, problems


def _image_key_of_mask(mask_key: str, image_by_key: dict[str, str]) -> str | None:
    if mask_key in image_by_key:
        return mask_key
    for suffix in MASK_NAME_SUFFIXES:
        if mask_key.endswith(suffix) and mask_key[: -len(suffix)] in image_by_key:
            return mask_key[: -len(suffix)]
    return None


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` by posix path relative to it, sorted; hidden files and folders skipped."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(dirpath, name)
                found[path.relative_to(folder).as_posix()] = path
    return dict(sorted(found.items()))


def _stem_key(rel: str) -> str:
    """Relative path without its image extension: the name images and masks are matched by."""
    path = PurePosixPath(rel)
    return path.with_suffix("").as_posix() if path.suffix.lower() in IMAGE_SUFFIXES else rel


def _shown(root: Path, path: Path, folder: bool = False) -> str:
    """``path`` relative to the data set root (folders with a trailing slash), for short messages."""
    try:
        text = path.relative_to(root).as_posix()
    except ValueError:
        text = str(path)
    return text + "/" if folder else text


def _unique_pairs(dataset: Dataset, splits: Iterable[str]) -> dict[Pair, str]:
    """Each pair of ``splits`` once (a split may alias another), with the first split using it."""
    unique: dict[Pair, str] = {}
    for split in splits:
        for pair in dataset.pairs(split):
            unique.setdefault(pair, split)
    return unique


def _chosen_splits(dataset: Dataset, splits: Iterable[str] | None) -> list[str]:
    return list(dataset.splits) if splits is None else list(dict.fromkeys(splits))


# --------------------------------------------------------------------------- checking


@dataclass
class SplitStats:
    pairs: int
    sizes: Counter  # (height, width) -> number of images of that size
    class_pixels: np.ndarray  # int64 (num_classes,): pixels labelled with each class
    present_pixels: np.ndarray  # int64 (num_classes,): pixels of the masks in which each class appears

    @property
    def class_share(self) -> np.ndarray:
        """Fraction of the labelled pixels that belong to each class (float64, sums to 1 unless empty)."""
        total = self.class_pixels.sum()
        return self.class_pixels / total if total else np.zeros(len(self.class_pixels))


@dataclass
class CheckReport:
    problems: list[Problem]
    splits: dict[str, SplitStats]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _PairResult:
    size: tuple[int, int] | None  # (height, width) of the decoded image
    counts: np.ndarray | None  # class pixel counts of the decoded mask
    problems: list[Problem]


def check_dataset(
    dataset: Dataset,
    classes: ClassTable,
    splits: Iterable[str] | None = None,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Decode every image and mask of ``splits`` (all by default) and collect every problem and statistic.

    ``progress(done, total)`` is called from this thread after each pair.
    """
    chosen = _chosen_splits(dataset, splits)
    unique = _unique_pairs(dataset, chosen)
    results = _check_pairs(unique, classes, workers, progress)
    problems = [p for p in dataset.problems if p.split is None or p.split in chosen]
    problems += [p for result in results.values() for p in result.problems]
    stats = {split: _split_stats(dataset.pairs(split), results, classes.num_classes) for split in chosen}
    return CheckReport(problems, stats)


def _check_pairs(
    unique: dict[Pair, str], classes: ClassTable, workers: int, progress: Callable[[int, int], None] | None
) -> dict[Pair, _PairResult]:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        futures = {pair: pool.submit(_check_pair, pair, classes, split) for pair, split in unique.items()}
        for done, _ in enumerate(as_completed(futures.values()), 1):
            if progress is not None:
                progress(done, len(futures))
        return {pair: future.result() for pair, future in futures.items()}


def _check_pair(pair: Pair, classes: ClassTable, split: str) -> _PairResult:
    problems: list[Problem] = []
    image = _decoded(read_image, pair.image, problems, split)
    mask = _decoded(lambda path: read_mask(path, classes), pair.mask, problems, split)
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        problems.append(_size_mismatch(pair, image.shape[:2], mask.shape, split))
    counts = None if mask is None else np.bincount(mask.ravel(), minlength=classes.num_classes).astype(np.int64)
    return _PairResult(None if image is None else image.shape[:2], counts, problems)


def _decoded(read: Callable[[Path], np.ndarray], path: Path, problems: list[Problem], split: str) -> np.ndarray | None:
    try:
        return read(path)
    except FcnError as exc:
        problems.append(Problem(path, _without_path(str(exc), path), split))
    except Exception as exc:  # a checker must report every bad file, whatever the decoder throws
        problems.append(Problem(path, f"cannot decode ({exc!r}); replace or remove the file", split))
    return None


def _without_path(message: str, path: Path) -> str:
    """The FcnError text minus its leading '<path>: ', which Problem adds back."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _size_mismatch(pair: Pair, image_hw: tuple[int, int], mask_hw: tuple[int, int], split: str) -> Problem:
    (ih, iw), (mh, mw) = image_hw, mask_hw
    return Problem(
        pair.mask,
        f"mask is {mw}x{mh} but its image {pair.image.name} is {iw}x{ih} (WxH); masks must match their image",
        split,
    )


def _split_stats(pairs: list[Pair], results: dict[Pair, _PairResult], num_classes: int) -> SplitStats:
    sizes: Counter = Counter()
    class_pixels = np.zeros(num_classes, np.int64)
    present_pixels = np.zeros(num_classes, np.int64)
    for pair in pairs:
        result = results[pair]
        if result.size is not None:
            sizes[result.size] += 1
        if result.counts is not None:
            class_pixels += result.counts
            present_pixels += np.where(result.counts > 0, result.counts.sum(), 0)
    return SplitStats(len(pairs), sizes, class_pixels, present_pixels)


def quick_check(dataset: Dataset, classes: ClassTable, splits: Iterable[str]) -> list[Problem]:
    """Pairing problems and image/mask size mismatches of ``splits``, from file headers only.

    Meant to run before every training run (a few ms per hundred pairs); decoding errors and bad mask
    values surface when the pipeline loads the data. ``classes`` is unused by these header-only checks
    but kept so the call mirrors check_dataset. FcnError when a split is missing.
    """
    chosen = _chosen_splits(dataset, splits)
    problems = [p for p in dataset.problems if p.split in chosen]
    for pair, split in _unique_pairs(dataset, chosen).items():
        problems += _header_problems(pair, split)
    return problems


def _header_problems(pair: Pair, split: str) -> list[Problem]:
    problems: list[Problem] = []
    sizes = []
    for path in (pair.image, pair.mask):
        try:
            sizes.append(image_size(path))
        except FcnError as exc:
            problems.append(Problem(path, _without_path(str(exc), path), split))
    # A photo with an EXIF rotation is stored sideways: its header size may be the mask's, swapped.
    # Decoding (pipeline.load_arrays) checks the upright size.
    if len(sizes) == 2 and sizes[1] not in (sizes[0], sizes[0][::-1]):
        problems.append(_size_mismatch(pair, sizes[0], sizes[1], split))
    return problems


# --------------------------------------------------------------------------- class weights


def median_frequency_weights(
    class_pixels: np.ndarray, present_pixels: np.ndarray, ignore_index: int | None = None
) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015, as in SegNet): float32 weight per class.

    freq(c) = pixels of class c / pixels of the images in which c appears; weight(c) = median(freq) / freq(c),
    the median taken over the classes that appear (the ignored class excluded). The ignored class gets 0.
    A class that never appears gets 1.0, a neutral weight: it contributes no loss on this data anyway, and
    a zero would silently switch it off should it appear in data the weights are reused for.
    """
    class_pixels = np.asarray(class_pixels, np.float64)
    present_pixels = np.asarray(present_pixels, np.float64)
    freq = np.divide(class_pixels, present_pixels, out=np.zeros_like(class_pixels), where=present_pixels > 0)
    counted = freq > 0
    if ignore_index is not None:
        counted[ignore_index] = False
    weights = np.ones(len(freq), np.float64)
    if counted.any():
        weights[counted] = np.median(freq[counted]) / freq[counted]
    if ignore_index is not None:
        weights[ignore_index] = 0.0
    return weights.astype(np.float32)


# --------------------------------------------------------------------------- rendering


def render_report(report: CheckReport, classes: ClassTable, console) -> None:
    """Splits table, classes table (share and median-frequency weight) and every problem, on a rich Console."""
    console.print(_splits_table(report))
    console.print(_classes_table(report, classes))
    if report.problems:
        from rich.text import Text

        console.print(Text(f"{len(report.problems)} problem(s):", style="bold red"))
        for problem in report.problems:
            # Text, not markup: a path may contain [brackets]; soft_wrap keeps one problem per line.
            console.print(Text(str(problem)), soft_wrap=True)
    else:
        console.print("[bold green]no problems found[/]")


def _class_stats(report: CheckReport, classes: ClassTable):
    """(the split the class figures come from, pixels per class, share, median-frequency weight)."""
    split = "train" if "train" in report.splits else next(iter(report.splits), None)
    stats = report.splits.get(split) if split else None
    zeros = np.zeros(classes.num_classes, np.int64)
    class_pixels, present = (stats.class_pixels, stats.present_pixels) if stats else (zeros, zeros)
    share = stats.class_share if stats else np.zeros(classes.num_classes)
    return split, class_pixels, share, median_frequency_weights(class_pixels, present, classes.ignore_index)


def report_json(report: CheckReport, classes: ClassTable, directory: Path) -> dict:
    """``fcn data check --json``: the same facts as the tables, schema ``fcn.data-check/1`` (docs/json.md)."""
    split, class_pixels, share, weights = _class_stats(report, classes)
    return {
        "schema": "fcn.data-check/1",
        "data": str(directory),
        "ok": report.ok,
        "splits": {
            name: {"pairs": s.pairs, "problems": sum(p.split == name for p in report.problems),
                   "sizes": [{"height": h, "width": w, "count": n} for (h, w), n in s.sizes.most_common()]}
            for name, s in report.splits.items()
        },
        "classes_from": split,
        "classes": [
            {"index": i, "name": name, "color": list(colour), "ignored": i == classes.ignore_index,
             "pixels": int(class_pixels[i]), "share": float(share[i]), "median_frequency_weight": float(weights[i])}
            for i, (name, colour) in enumerate(zip(classes.names, classes.colors))
        ],
        "problems": [{"path": str(p.path), "message": p.message, "split": p.split} for p in report.problems],
    }


def _splits_table(report: CheckReport):
    from rich.table import Table

    table = Table(title="splits")
    table.add_column("split")
    table.add_column("pairs", justify="right")
    table.add_column("image sizes (W x H: count)")
    table.add_column("problems", justify="right")
    for split, stats in report.splits.items():
        sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in stats.sizes.most_common())
        problems = sum(p.split == split for p in report.problems)
        table.add_row(split, str(stats.pairs), sizes or "-", str(problems))
    return table


def _classes_table(report: CheckReport, classes: ClassTable):
    from rich.table import Table

    split, _, share, weights = _class_stats(report, classes)
    table = Table(title="classes")
    table.add_column("#", justify="right")
    table.add_column("name")
    table.add_column("colour")
    table.add_column(f"share of {split or '-'} pixels", justify="right")
    table.add_column("median-freq weight", justify="right")
    for index, (name, (r, g, b)) in enumerate(zip(classes.names, classes.colors)):
        note = " (ignored)" if index == classes.ignore_index else ""
        swatch = f"[on rgb({r},{g},{b})]      [/]"
        table.add_row(str(index), name + note, swatch, f"{100 * share[index]:.2f} %", f"{weights[index]:.3f}")
    return table


def require_data_folder(data_dir: Path) -> None:
    """One line naming the missing training folder and how to get data into it."""
    if not Path(data_dir).exists():
        raise FcnError(
            f"{data_dir}: data folder not found; get CamVid with `fcn data download camvid --dir {data_dir}` "
            "or make a demo set with `fcn data synthetic DIR` and pass --data DIR"
        )
