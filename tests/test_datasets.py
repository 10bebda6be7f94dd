"""Layout detection, pairing, full and quick checks, class statistics and the rich report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from fcn_cli.classes import CAMVID
from fcn_cli.datasets import (
    SPLITS,
    Problem,
    check_dataset,
    find_dataset,
    median_frequency_weights,
    quick_check,
    render_report,
)
from fcn_cli.errors import FcnError
from fcn_cli.images import read_mask

# CamVid README: share of each class in the train split's pixels, in percent.
CAMVID_TRAIN_SHARES = [16.9, 23.3, 1.0, 31.7, 4.5, 9.7, 1.2, 1.1, 5.9, 0.6, 0.3, 4.0]


@pytest.fixture(scope="module")
def samples(source_dir) -> list[tuple[Path, Path]]:
    """Four (image, mask) pairs of the source set's train split."""
    images = sorted((source_dir / "train").glob("*.png"))[:4]
    return [(image, source_dir / "trainannot" / image.name) for image in images]


def place(samples, pairs: dict[str, tuple[int, str]]) -> None:
    """Copy sample pair ``index`` to image path ``dest_image`` / mask path ``dest_mask`` for each item."""
    for (image_dest, mask_dest), index in pairs.items():
        for source, dest in zip(samples[index], (image_dest, mask_dest)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)


def segnet_set(root: Path, samples, train: int = 3, val: int = 1) -> Path:
    layout = {}
    for i in range(train):
        layout[(root / "train" / f"s{i}.png", root / "trainannot" / f"s{i}.png")] = i
    for i in range(val):
        layout[(root / "val" / f"v{i}.png", root / "valannot" / f"v{i}.png")] = 3 - i
    place(samples, layout)
    return root


def prepped_set(root: Path, samples, names: dict[str, str]) -> None:
    """The prepped layout (images_prepped_<split>/, annotations_prepped_<split>/): one pair per split,
    named ``names[split]``, copied from consecutive samples."""
    place(samples, {(root / f"images_prepped_{split}" / name, root / f"annotations_prepped_{split}" / name): i
                    for i, (split, name) in enumerate(names.items())})


def as_jpeg(path: Path) -> Path:
    """Re-save an image as JPEG beside itself (removing the PNG); returns the new path."""
    jpeg = path.with_suffix(".jpg")
    Image.open(path).convert("RGB").save(jpeg, quality=90)
    path.unlink()
    return jpeg


# --------------------------------------------------------------------------- layouts


def test_segnet_layout(tmp_path, samples):
    dataset = find_dataset(segnet_set(tmp_path, samples))
    assert dataset.layout == "segnet"
    assert list(dataset.splits) == ["train", "val"]
    assert [p.name for p in dataset.pairs("train")] == ["s0.png", "s1.png", "s2.png"]
    assert dataset.pairs("val")[0].mask == tmp_path / "valannot" / "v0.png"
    assert dataset.problems == []


def test_missing_split_names_what_exists(tmp_path, samples):
    dataset = find_dataset(segnet_set(tmp_path, samples))
    with pytest.raises(FcnError, match=r"no 'test' split; found: train, val$"):
        dataset.pairs("test")


def test_real_camvid_is_segnet(camvid_dir):
    dataset = find_dataset(camvid_dir)
    assert dataset.layout == "segnet"
    assert {s: len(p) for s, p in dataset.splits.items()} == {"train": 367, "val": 101}
    assert dataset.problems == []


def test_prepped_layout_test_serves_as_val(tmp_path, samples):
    prepped_set(tmp_path, samples, {"train": "a.png", "test": "c.png"})
    place(samples, {(tmp_path / "images_prepped_train" / "b.png", tmp_path / "annotations_prepped_train" / "b.png"): 2})
    dataset = find_dataset(tmp_path)
    assert dataset.layout == "prepped"
    assert list(dataset.splits) == ["train", "val", "test"]
    assert dataset.pairs("val") == dataset.pairs("test")
    assert [p.name for p in dataset.pairs("train")] == ["a.png", "b.png"]
    # The aliased split is decoded once, but counted in both.
    report = check_dataset(dataset, CAMVID, workers=2)
    assert report.ok and report.splits["val"].pairs == report.splits["test"].pairs == 1


def test_prepped_layout_with_val(tmp_path, samples):
    prepped_set(tmp_path, samples, {"train": "a.png", "val": "v.png", "test": "t.png"})
    dataset = find_dataset(tmp_path)
    assert [p.name for p in dataset.pairs("val")] == ["v.png"]
    assert [p.name for p in dataset.pairs("test")] == ["t.png"]


def test_generic_flat_layout_pairs_by_stem_and_suffix(tmp_path, samples):
    images, masks = tmp_path / "images", tmp_path / "masks"
    place(samples, {
        (images / "a.png", masks / "a.png"): 0,
        (images / "b.png", masks / "b_mask.png"): 1,
        (images / "town" / "c.png", masks / "town" / "c_L.png"): 2,
        (images / ".hidden" / "d.png", masks / ".hidden" / "d.png"): 3,
    })
    as_jpeg(images / "a.png")
    (images / ".e.png").write_bytes(b"not an image")  # hidden: ignored
    (images / "notes.txt").write_text("not an image either")
    dataset = find_dataset(tmp_path)
    assert dataset.layout == "generic"
    assert list(dataset.splits) == ["train"]
    pairs = dataset.pairs("train")
    assert [p.name for p in pairs] == ["a.jpg", "b.png", "town/c.png"]
    assert [p.mask.name for p in pairs] == ["a.png", "b_mask.png", "c_L.png"]
    assert dataset.problems == []


def test_exact_mask_name_wins_over_suffixed(tmp_path, samples):
    place(samples, {
        (tmp_path / "images" / "a.png", tmp_path / "masks" / "a_L.png"): 0,
        (tmp_path / "images" / "b.png", tmp_path / "masks" / "a.png"): 1,
    })
    shutil.copyfile(tmp_path / "masks" / "a.png", tmp_path / "masks" / "b.png")
    dataset = find_dataset(tmp_path)
    assert dataset.pairs("train")[0].mask.name == "a.png"
    assert [(p.path.name, p.message.split(" (")[0]) for p in dataset.problems] == [("a_L.png", "second mask for a.png")]


def test_generic_split_folders(tmp_path, samples):
    images, masks = tmp_path / "images", tmp_path / "masks"
    place(samples, {
        (images / "train" / "a.png", masks / "train" / "a.png"): 0,
        (images / "train" / "b.png", masks / "train" / "b.png"): 1,
        (images / "val" / "c.png", masks / "val" / "c.png"): 2,
    })
    dataset = find_dataset(tmp_path)
    names = {split: [p.name for p in pairs] for split, pairs in dataset.splits.items()}
    assert names == {"train": ["a.png", "b.png"], "val": ["c.png"]}


def test_generic_list_files(tmp_path, samples):
    images, masks = tmp_path / "images", tmp_path / "masks"
    place(samples, {
        (images / "a.png", masks / "a.png"): 0,
        (images / "sub" / "b.png", masks / "sub" / "b.png"): 1,
        (images / "c.png", masks / "c.png"): 2,
        (images / "unused.png", masks / "unused.png"): 3,
    })
    (tmp_path / "train.txt").write_text("# training images\na\nimages/sub/b.png\n\nmissing\n")
    (tmp_path / "val.txt").write_text("c.png\n")
    dataset = find_dataset(tmp_path)
    assert [p.name for p in dataset.pairs("train")] == ["a.png", "sub/b.png"]
    assert [p.name for p in dataset.pairs("val")] == ["c.png"]
    assert [str(p) for p in dataset.problems] == [f"{tmp_path / 'train.txt'}: line 5: no image 'missing' under images/"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "nowhere", "folder not found"),
        (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "is a file"),
        (lambda root: root, "folder is empty"),
        (lambda root: (root / "photos").mkdir() or root, "no data set layout recognised (found photos/)"),
        (lambda root: [(root / d).mkdir() for d in ("train", "trainannot")] and root, "segnet layout but no image"),
    ],
    ids=["missing", "file", "empty", "unrecognised", "no-images"],
)
def test_find_dataset_refuses_with_one_line_naming_folder_and_fix(tmp_path, make, message):
    root = make(tmp_path)
    with pytest.raises(FcnError) as info:
        find_dataset(root)
    text = str(info.value)
    assert text.startswith(f"{root}: ") and message in text
    assert "fcn data synthetic" in text and "\n" not in text


# --------------------------------------------------------------------------- masks and problems


def test_index_and_colour_masks_read_identically(tmp_path, samples):
    index_set = segnet_set(tmp_path / "index", samples)
    colour_set = segnet_set(tmp_path / "colour", samples)
    for mask in sorted((colour_set / "trainannot").glob("*.png")):
        colour = CAMVID.colorize(np.asarray(Image.open(mask)))
        Image.fromarray(colour).save(mask)
        assert np.array_equal(read_mask(mask, CAMVID), read_mask(index_set / "trainannot" / mask.name, CAMVID))
    by_index = check_dataset(find_dataset(index_set), CAMVID, workers=2)
    by_colour = check_dataset(find_dataset(colour_set), CAMVID, workers=2)
    assert by_index.ok and by_colour.ok
    for split in ("train", "val"):
        assert np.array_equal(by_index.splits[split].class_pixels, by_colour.splits[split].class_pixels)


def drop_mask(root: Path) -> tuple[Path, str]:
    (root / "trainannot" / "s1.png").unlink()
    return root / "train" / "s1.png", "no mask (expected trainannot/s1.png)"


def drop_image(root: Path) -> tuple[Path, str]:
    (root / "train" / "s1.png").unlink()
    return root / "trainannot" / "s1.png", "no image for this mask in train/"


def shrink_mask(root: Path) -> tuple[Path, str]:
    mask = root / "trainannot" / "s1.png"
    image = Image.open(mask)
    image.resize((image.width // 2, image.height // 2), Image.NEAREST).save(mask)
    return mask, f"mask is {image.width // 2}x{image.height // 2} but its image s1.png is {image.width}x{image.height}"


def value_200(root: Path) -> tuple[Path, str]:
    mask = root / "trainannot" / "s1.png"
    index = np.asarray(Image.open(mask)).copy()
    index[:5, :5] = 200
    Image.fromarray(index).save(mask)
    return mask, "mask value 200 is not a class index (0..11, 25 pixels)"


def unknown_colour(root: Path) -> tuple[Path, str]:
    mask = root / "trainannot" / "s1.png"
    colour = CAMVID.colorize(np.asarray(Image.open(mask)))
    colour[2, 3] = (1, 2, 3)
    Image.fromarray(colour).save(mask)
    return mask, "1 pixels have colour (1, 2, 3) (first at x=3, y=2) that is not in the class palette"


def truncated_png(root: Path) -> tuple[Path, str]:
    image = root / "train" / "s1.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image, "cannot decode image"


SPOILERS = [drop_mask, drop_image, shrink_mask, value_200, unknown_colour, truncated_png]


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__)
def test_each_bad_input_is_one_problem_naming_the_file(tmp_path, samples, spoil):
    root = segnet_set(tmp_path, samples)
    path, message = spoil(root)
    report = check_dataset(find_dataset(root), CAMVID, workers=2)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.path == path and message in problem.message and problem.split == "train"
    assert str(problem).startswith(f"{path}: ")


def test_check_lists_every_problem_and_still_counts_the_good_pairs(tmp_path, samples):
    root = tmp_path
    expected = []
    # One spoiled pair per spoiler: copy sample pairs under distinct names, then spoil each by name.
    for n, spoil in enumerate(SPOILERS):
        part = segnet_set(tmp_path / f"part{n}", samples, train=2, val=0)
        path, message = spoil(part)
        for folder in ("train", "trainannot"):
            for file in sorted((part / folder).glob("*.png")):
                (root / folder).mkdir(exist_ok=True)
                file.rename(root / folder / f"p{n}_{file.name}")
        expected.append((root / path.parent.name / f"p{n}_{path.name}", message.replace("s1.png", f"p{n}_s1.png")))
    report = check_dataset(find_dataset(root), CAMVID, workers=3)
    found = {(p.path, p.message.split(";")[0]) for p in report.problems}
    assert len(report.problems) == len(SPOILERS)
    for path, message in expected:
        assert any(p == path and message in m for p, m in found), (path, message, found)
    # Pairs whose mask decoded still count: 6 sets x 2 pairs, minus the two with no pair.
    assert report.splits["train"].pairs == 2 * len(SPOILERS) - 2
    assert report.splits["train"].class_pixels.sum() > 0


def test_check_reports_progress_and_only_requested_splits(tmp_path, samples):
    dataset = find_dataset(segnet_set(tmp_path, samples, train=3, val=1))
    calls = []
    report = check_dataset(dataset, CAMVID, splits=["train"], workers=2, progress=lambda *args: calls.append(args))
    assert list(report.splits) == ["train"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(FcnError, match="no 'test' split"):
        check_dataset(dataset, CAMVID, splits=["test"])


def test_quick_check_reads_headers_only(tmp_path, samples):
    root = segnet_set(tmp_path, samples)
    mismatched, _ = shrink_mask(root)
    value_200(root)  # a bad value needs decoding: left to the pipeline
    (root / "valannot" / "v0.png").unlink()
    problems = quick_check(find_dataset(root), CAMVID, ["train"])
    assert [(p.path, p.split) for p in problems] == [(mismatched, "train")]
    assert "mask is" in problems[0].message


def test_quick_check_decodes_no_pixels_of_camvid(camvid_dir, monkeypatch):
    """Headers only on the real set: not one image's pixels are decoded (what keeps it quick)."""
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load  # what decoding a PNG or JPEG file runs
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    dataset = find_dataset(camvid_dir)
    assert quick_check(dataset, CAMVID, SPLITS[:2]) == []
    assert decoded == []
    np.asarray(Image.open(dataset.pairs("train")[0].image))  # the probe itself sees a decode
    assert len(decoded) == 1


# --------------------------------------------------------------------------- statistics and report


def test_median_frequency_weights_hand_computed():
    # Two images of 100 pixels: image 1 = 60 class0 + 40 class1; image 2 = 50 class0 + 30 class2 + 20 void.
    class_pixels = np.array([110, 40, 30, 0, 20])
    present_pixels = np.array([200, 100, 100, 0, 100])
    # freq = [0.55, 0.4, 0.3, -, (void)] -> median 0.4 -> weights 0.4/freq
    weights = median_frequency_weights(class_pixels, present_pixels, ignore_index=4)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, [0.4 / 0.55, 1.0, 0.4 / 0.3, 1.0, 0.0], rtol=1e-6)
    # Without an ignored class, void's 0.2 joins the median: median(0.55, 0.4, 0.3, 0.2) = 0.35.
    expected = [0.35 / 0.55, 0.35 / 0.4, 0.35 / 0.3, 1.0, 0.35 / 0.2]
    np.testing.assert_allclose(median_frequency_weights(class_pixels, present_pixels), expected, rtol=1e-6)


def test_present_pixels_count_whole_images(tmp_path, samples):
    root = segnet_set(tmp_path, samples, train=2, val=0)
    for n, fill in enumerate(([0, 1], [0, 2])):  # mask n: left half fill[0], right half fill[1]
        mask = np.full((4, 6), fill[0], np.uint8)
        mask[:, 3:] = fill[1]
        Image.fromarray(mask).save(root / "trainannot" / f"s{n}.png")
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "train" / f"s{n}.png")
    stats = check_dataset(find_dataset(root), CAMVID, workers=1).splits["train"]
    assert stats.class_pixels[:3].tolist() == [24, 12, 12] and stats.present_pixels[:3].tolist() == [48, 24, 24]
    assert stats.sizes == {(4, 6): 2}


def test_real_camvid_train_class_shares(camvid_dir):
    report = check_dataset(find_dataset(camvid_dir), CAMVID, splits=["train"], workers=4)
    assert report.ok, report.problems[:3]
    stats = report.splits["train"]
    assert stats.pairs == 367 and stats.sizes == {(360, 480): 367}
    np.testing.assert_allclose(100 * stats.class_share, CAMVID_TRAIN_SHARES, atol=0.3)
    weights = median_frequency_weights(stats.class_pixels, stats.present_pixels, CAMVID.ignore_index)
    # Rare classes weigh more than common ones; void is off.
    assert weights[10] > weights[2] > 1 > weights[0] > weights[3] and weights[11] == 0


def test_render_report_shows_splits_classes_and_problems(tmp_path, samples):
    root = segnet_set(tmp_path / "data[1]", samples)  # brackets: paths must not be read as rich markup
    path, _ = value_200(root)
    report = check_dataset(find_dataset(root), CAMVID, workers=2)
    console = Console(record=True, width=100, color_system=None)
    render_report(report, CAMVID, console)
    text = console.export_text()
    assert "splits" in text and "train" in text and "val" in text
    assert "side walk" in text and "void (ignored)" in text and "median-freq weight" in text
    assert "1 problem(s)" in text and f"{path}: mask value 200" in text.replace("\n", "")


def test_problem_str():
    assert str(Problem(Path("a/b.png"), "broken")) == "a/b.png: broken"
