"""Datasets for the accuracy harness, named by a SPEC string.

========================  ==========================================================================
SPEC                      what
========================  ==========================================================================
``shift-lab``             built-in, generated on the fly: style shift (filled/warm -> outline/cool)
``shift-lab:spurious``    built-in: spurious background hue (as Waterbirds)
``imagefolder:DIR``/DIR   ``DIR/{train,id_val,id_test,ood_test*}/<class>/<image>``
``waterbirds:DIR``        the Sagawa et al. release: ``DIR/metadata.csv`` + images
``domainnet:DIR``         Tan et al.'s lists: ``DIR/{sketch,real}_{train,test}.txt`` (sketch ID, real OOD)
``living17:DIR``          Living-17 exported as an ImageFolder (``id_*`` = source, ``ood_test`` = target)
``fmow:DIR``              WILDS-FMoW through the ``wilds`` package (root DIR)
``camelyon:DIR``          WILDS-Camelyon17 through the ``wilds`` package (root DIR)
========================  ==========================================================================

Each gives a :class:`DataBundle` with the paper's preprocessing for that dataset (Appendix A).
Missing or malformed data raise :class:`DataError`: one message naming the expected layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DataBundle", "DataError", "load_data", "DATA_KINDS"]


class DataError(ValueError):
    """The data is missing or not in the expected layout; the message names the layout."""


@dataclass
class DataBundle:
    """The splits of one dataset: ``ood_tests`` maps a split name (``ood_test``, ``ood_test_real``) to data."""

    name: str
    num_classes: int
    train: Dataset
    id_val: Dataset
    id_test: Dataset
    ood_tests: dict[str, Dataset]
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)
    train_eval: Dataset | None = None  # the training images with the test-time transform, where they differ

    def train_without_augmentation(self) -> Dataset:
        """The training split with the test-time transform: what a measurement at the initialisation
        (the layer-gradient diagnostic) reads, so that two measurements see the same pixels."""
        return self.train if self.train_eval is None else self.train_eval


IMAGEFOLDER_LAYOUT = (
    "DIR/train/<class>/*.jpg, DIR/id_val/<class>/*, DIR/id_test/<class>/*, and one or more DIR/ood_test*/<class>/* "
    "(the same class folders everywhere)"
)


def load_data(spec: str, image_size: int = 224) -> DataBundle:
    """The :class:`DataBundle` named by ``spec`` (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if kind == "shift-lab":
        return _shift_lab(rest or "style")
    if not sep:  # a bare directory is an ImageFolder layout
        if not Path(spec).is_dir():  # a mistyped SPEC, most likely: name them
            raise DataError(f"Invalid data: {spec!r} is neither a SPEC nor a folder (kinds: {DATA_KINDS})")
        kind, rest = "imagefolder", spec
    if kind not in _LOADERS:
        raise DataError(f"Invalid data: {spec!r} (kinds: {DATA_KINDS})")
    bundle = _LOADERS[kind](kind, Path(rest), image_size)
    _check_not_empty(bundle)
    return bundle


def _check_not_empty(bundle: DataBundle) -> None:
    """A split with no images would fail later, inside the LR schedule or the data loader: refuse it now,
    naming the split and what defined it (``info["sources"]``: split -> file or folder)."""
    splits = {"train": bundle.train, "id_val": bundle.id_val, "id_test": bundle.id_test, **bundle.ood_tests}
    for name, split in splits.items():
        if len(split) == 0:
            source = bundle.info.get("sources", {}).get(name, bundle.name)
            raise DataError(f"Invalid data {bundle.name}: the {name} split has no images (defined by {source})")


def _shift_lab(variant: str) -> DataBundle:
    from fused_ft.harness.data import shift_lab

    splits = {k: TensorDataset(*v) for k, v in shift_lab.make_splits(variant).items()}
    return DataBundle(f"shift-lab:{variant}", len(shift_lab.TARGET_SHAPES), splits["train"], splits["id_val"],
                      splits["id_test"], {"ood_test": splits["ood_test"]}, shift_lab.IMAGE_SIZE)


def _imagefolder(kind: str, root: Path, image_size: int) -> DataBundle:
    from torchvision.datasets import ImageFolder

    from fused_ft.harness.data.transforms import paper_transforms

    required = ["train", "id_val", "id_test"]
    missing = [s for s in required if not (root / s).is_dir()]
    oods = sorted(p.name for p in root.glob("ood_test*") if p.is_dir()) if root.is_dir() else []
    if missing or not oods:
        what = ", ".join(missing + ([] if oods else ["ood_test*"]))
        raise DataError(f"Invalid data {kind}:{root}: missing {what}; expected {IMAGEFOLDER_LAYOUT}")
    train_tf, test_tf = paper_transforms(kind, image_size)
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf)
        train_eval = ImageFolder(str(root / "train"), transform=test_tf)
        splits = {s: ImageFolder(str(root / s), transform=test_tf) for s in ["id_val", "id_test", *oods]}
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"Invalid data {kind}:{root}: {exc}; expected {IMAGEFOLDER_LAYOUT}") from None
    for ds in (train, *splits.values()):
        _check_images(kind, root, [Path(path) for path, _ in ds.samples])
    for s, ds in splits.items():
        if ds.classes != train.classes:
            raise DataError(f"Invalid data {kind}:{root}: {s} has classes {ds.classes}, train has {train.classes}; "
                            f"expected {IMAGEFOLDER_LAYOUT}")
    return DataBundle(f"{kind}:{root}", len(train.classes), train, splits["id_val"], splits["id_test"],
                      {s: splits[s] for s in oods}, image_size,
                      {"classes": train.classes,
                       "sources": {s: root / s for s in ["train", "id_val", "id_test", *oods]}}, train_eval)


def _check_images(kind: str, root: Path, paths: list[Path]) -> None:
    """Every file's header, read once when the dataset is built: an unreadable image stops the run
    here, in one line naming the file, not as a traceback in the middle of training."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Invalid data {kind}:{root}: cannot read the image {path} ({type(exc).__name__}); "
                            "fix or remove it") from None


class _ListDataset(Dataset):
    """(path, label) pairs read with PIL."""

    def __init__(self, items: list[tuple[Path, int]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


WATERBIRDS_LAYOUT = ("DIR/metadata.csv with columns img_filename,y,split,place (split 0/1/2 = train/val/test) "
                     "and the images")


def _waterbirds(kind: str, root: Path, image_size: int) -> DataBundle:
    from fused_ft.harness.data import tables
    from fused_ft.harness.data.transforms import paper_transforms

    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DataError(f"Invalid data waterbirds:{root}: no metadata.csv; expected {WATERBIRDS_LAYOUT}")
    rows = []  # (image, y, split, place)
    for line, r in tables.read_csv(meta, ("img_filename", "y", "split", "place"), WATERBIRDS_LAYOUT):
        values = {c: tables.integer(r[c], meta, line, c, WATERBIRDS_LAYOUT) for c in ("y", "split", "place")}
        for column, allowed in (("y", (0, 1)), ("place", (0, 1)), ("split", (0, 1, 2))):
            if values[column] not in allowed:
                raise DataError(f"Invalid data file {meta}: line {line}, column {column}: {r[column]!r} is not one "
                                f"of {', '.join(map(str, allowed))}; expected {WATERBIRDS_LAYOUT}")
        rows.append((root / r["img_filename"], values["y"], values["split"], values["place"]))
    train_tf, test_tf = paper_transforms("waterbirds", image_size)

    def items(split: int, group=None):
        return [(path, y) for path, y, s, place in rows if s == split and (group is None or group(y, place))]

    majority = lambda y, place: y == place  # noqa: E731 - landbirds on land, waterbirds on water
    sources = {name: f"{meta} (split {split}{detail})" for name, split, detail in
               (("train", 0, ""), ("id_val", 1, ""), ("id_test", 2, ", y == place"), ("ood_test", 2, ", y != place"))}
    return DataBundle(
        f"waterbirds:{root}", 2, _ListDataset(items(0), train_tf), _ListDataset(items(1), test_tf),
        _ListDataset(items(2, majority), test_tf),
        {"ood_test": _ListDataset(items(2, lambda y, place: not majority(y, place)), test_tf)}, image_size,
        {"sources": sources})


DOMAINNET_LAYOUT = "DIR/{sketch,real}_{train,test}.txt with lines '<relative path> <label>' (Tan et al. 2020)"


def _domainnet(kind: str, root: Path, image_size: int) -> DataBundle:
    from fused_ft.harness.data.transforms import paper_transforms

    from fused_ft.harness.data import tables

    def read(name: str) -> list[tuple[Path, int]]:
        path = root / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"Invalid data domainnet:{root}: no {path.name}; expected {DOMAINNET_LAYOUT}")
        out = []
        for line, relative, label in tables.read_list(path, DOMAINNET_LAYOUT):
            if label < 0:
                raise DataError(f"Invalid data file {path}: line {line}, column label: {label} is negative; "
                                f"expected {DOMAINNET_LAYOUT}")
            out.append((root / relative, label))
        return out

    train_tf, test_tf = paper_transforms("domainnet", image_size)
    train = read("sketch_train")
    # ID validation: a fixed 10% of the sketch training list, as the sketch test list is the ID test
    cut = len(train) // 10
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    val_items = [train[i] for i in order[:cut]]
    train_items = [train[i] for i in order[cut:]]
    labels = {label for _, label in train}
    sources = {"train": root / "sketch_train.txt", "id_val": f"{root / 'sketch_train.txt'} (a fixed 10%)",
               "id_test": root / "sketch_test.txt", "ood_test": root / "real_test.txt"}
    return DataBundle(f"domainnet:{root}", max(labels, default=-1) + 1, _ListDataset(train_items, train_tf),
                      _ListDataset(val_items, test_tf), _ListDataset(read("sketch_test"), test_tf),
                      {"ood_test": _ListDataset(read("real_test"), test_tf)}, image_size, {"sources": sources},
                      _ListDataset(train_items, test_tf))


def _wilds(kind: str, root: Path, image_size: int) -> DataBundle:
    from fused_ft.harness.data.transforms import paper_transforms

    try:
        import wilds
    except ImportError:
        raise DataError(f"Invalid data {kind}:{root}: WILDS datasets need the wilds package (pip install wilds) "
                        f"and the data under {root} "
                        f"(wilds layout: {root}/{kind if kind == 'fmow' else 'camelyon17'}_v1.x)") from None
    name = "fmow" if kind == "fmow" else "camelyon17"
    try:
        dataset = wilds.get_dataset(dataset=name, root_dir=str(root), download=False)
    except Exception as exc:  # noqa: BLE001 - wilds raises several types for a missing/partial download
        raise DataError(f"Invalid data {kind}:{root}: {exc} "
                        f"(expected the wilds layout for {name} under {root})") from None
    train_tf, test_tf = paper_transforms(kind, image_size)
    # Camelyon17 has no ID test split in WILDS: its ID validation split doubles as the ID test
    id_test = "id_test" if "id_test" in dataset.split_dict else "id_val"
    splits = {"train": "train", "id_val": "id_val", "id_test": id_test, "ood_test": "test"}
    subsets = {k: dataset.get_subset(v, transform=train_tf if k == "train" else test_tf) for k, v in splits.items()}
    return DataBundle(f"{kind}:{root}", dataset.n_classes, subsets["train"], subsets["id_val"], subsets["id_test"],
                      {"ood_test": subsets["ood_test"]}, image_size,
                      train_eval=dataset.get_subset("train", transform=test_tf))


_LOADERS = {"imagefolder": _imagefolder, "living17": _imagefolder, "waterbirds": _waterbirds, "domainnet": _domainnet,
            "fmow": _wilds, "camelyon": _wilds}
DATA_KINDS = "shift-lab[:spurious], " + ", ".join(f"{kind}:DIR" for kind in _LOADERS)  # what a SPEC may name
