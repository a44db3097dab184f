"""Metadata and list files as people and tools write them (fused_ft/harness/data/tables.py), and splits that come
out empty.

Catches: Waterbirds' metadata.csv written by pandas (``0.0``/``1.0`` in integer columns) stopping with
"invalid literal for int() with base 10: '0.0'" (the landed code) or, compared as text, giving empty
splits; a BOM, CRLF, spaces, quotes or extra columns that change what is read; a malformed value whose
message names no file, line or column; an empty split that fails later in the LR schedule or the data
loader, or leaves an output folder behind.
"""
from __future__ import annotations

import pytest
from PIL import Image

from fused_ft import cli
from fused_ft.harness.data import DataError, load_data

# (image, y, split, place): every split and both Waterbirds groups of the test split present
WATERBIRDS_ROWS = [("a/0.png", 0, 0, 0), ("a/1.png", 1, 0, 1), ("a/2.png", 1, 0, 0), ("b/3.png", 0, 1, 0),
                   ("b/4.png", 1, 1, 1), ("c/5.png", 0, 2, 0), ("c/6.png", 1, 2, 0), ("c/7.png", 1, 2, 1)]


def _images(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40, 90, 160)).save(root / name)


def _waterbirds(root, rows=WATERBIRDS_ROWS, header="img_filename,y,split,place", row=None, newline="\n",
                bom=False):
    _images(root, [r[0] for r in rows])
    row = row or (lambda name, y, split, place: f"{name},{y},{split},{place}")
    text = newline.join([header, *(row(*r) for r in rows)]) + newline
    (root / "metadata.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return root


def _items(bundle):
    splits = {"train": bundle.train, "id_val": bundle.id_val, "id_test": bundle.id_test, **bundle.ood_tests}
    return {k: [(p.name, y) for p, y in v.items] for k, v in splits.items()}


WATERBIRDS_VARIANTS = {
    "pandas float columns": dict(row=lambda n, y, s, p: f"{n},{float(y)},{float(s)},{float(p)}"),
    "spaces around fields": dict(header=" img_filename , y , split , place ",
                                 row=lambda n, y, s, p: f" {n} , {y} ,{s}, {p} "),
    "UTF-8 byte-order mark": dict(bom=True),
    "CRLF line endings": dict(newline="\r\n"),
    "quoted fields": dict(row=lambda n, y, s, p: f'"{n}","{y}","{s}","{p}"'),
    "extra columns, other order": dict(header="place_filename,split,img_filename,y,place,wb_id",
                                       row=lambda n, y, s, p: f"x.png,{s},{n},{y},{p},17"),
    "all at once": dict(header='"place_filename" , "split",img_filename,y,place', bom=True, newline="\r\n",
                        row=lambda n, y, s, p: f'x.png,{float(s)}, "{n}" ,{y}.0 , {p}'),
}


@pytest.mark.parametrize("variant", list(WATERBIRDS_VARIANTS))
def test_waterbirds_metadata_as_people_write_it_reads_as_the_plain_file(variant, tmp_path):
    plain = _items(load_data(f"waterbirds:{_waterbirds(tmp_path / 'plain')}"))
    assert plain == {"train": [("0.png", 0), ("1.png", 1), ("2.png", 1)], "id_val": [("3.png", 0), ("4.png", 1)],
                     "id_test": [("5.png", 0), ("7.png", 1)], "ood_test": [("6.png", 1)]}
    assert _items(load_data(f"waterbirds:{_waterbirds(tmp_path / 'v', **WATERBIRDS_VARIANTS[variant])}")) == plain


@pytest.mark.parametrize("row,message", [
    (lambda n, y, s, p: f"{n},0.5,{s},{p}", r"line 2, column y: '0.5' is not an integer"),
    (lambda n, y, s, p: f"{n},{y},train,{p}", r"line 2, column split: 'train' is not an integer"),
    (lambda n, y, s, p: f"{n},{y},{s},", r"line 2, column place: '' is not an integer"),
    (lambda n, y, s, p: f"{n},2,{s},{p}", r"line 2, column y: '2' is not one of 0, 1"),
    (lambda n, y, s, p: f"{n},{y}", r"line 2, column split: '' is not present \(the row has 2 fields\)"),
])
def test_malformed_waterbirds_rows_are_refused_naming_file_line_and_column(row, message, tmp_path):
    root = _waterbirds(tmp_path, row=row)
    with pytest.raises(DataError, match=rf"Invalid data file {tmp_path}/metadata.csv: {message}; expected "
                                        r"DIR/metadata.csv with columns img_filename,y,split,place"):
        load_data(f"waterbirds:{root}")
    with pytest.raises(DataError, match=r"line 1 \(the header\) lacks the columns place \(it has img_filename, y, "):
        load_data(f"waterbirds:{_waterbirds(tmp_path / 'h', header='img_filename,y,split,location')}")


def _domainnet(root, line=None, newline="\n", bom=False, n_train=20):
    lists = {"sketch_train": [(f"sketch/cat/{i}.png", i % 3) for i in range(n_train)],
             "sketch_test": [("sketch/dog/t0.png", 1), ("sketch/my cat/t 1.png", 0)],
             "real_test": [("real/cat/r0.png", 0), ("real/dog/r1.png", 2)]}
    line = line or _quoted
    for name, items in lists.items():
        _images(root, [p for p, _ in items])
        text = newline.join(line(p, label) for p, label in items) + newline
        (root / f"{name}.txt").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return root


def _quoted(path, label):
    return f'"{path}" {label}' if " " in path else f"{path} {label}"


DOMAINNET_VARIANTS = {
    "CRLF line endings": dict(line=_quoted, newline="\r\n"),
    "UTF-8 byte-order mark": dict(line=_quoted, bom=True),
    "tabs and spaces": dict(line=lambda p, label: f"  {_quoted(p, label)}\t\t".replace(" ", "\t", 1)),
    "integral float labels": dict(line=lambda p, label: _quoted(p, float(label))),
    "extra columns": dict(line=lambda p, label: f"{_quoted(p, label)} 0.93 extra"),
}


@pytest.mark.parametrize("variant", list(DOMAINNET_VARIANTS))
def test_domainnet_lists_as_people_write_them_read_as_the_plain_lists(variant, tmp_path):
    plain = _items(load_data(f"domainnet:{_domainnet(tmp_path / 'plain', line=_quoted)}"))
    assert plain["id_test"] == [("t0.png", 1), ("t 1.png", 0)]  # a quoted path with spaces
    assert _items(load_data(f"domainnet:{_domainnet(tmp_path / 'v', **DOMAINNET_VARIANTS[variant])}")) == plain


@pytest.mark.parametrize("line,message", [
    (lambda p, label: f"{p} {label + 0.5}", r"line 1, column label: '0.5' is not an integer"),
    (lambda p, label: p, r"line 1, column label: 'sketch/cat/0.png' is not a path and a label"),
    (lambda p, label: f"{p.replace('/', ' / ')} {label}", r"line 1, column label: '/' is not an integer"),
    (lambda p, label: f'"{p} {label}', r"line 1, column path: .* is not a path and a label"),
])
def test_malformed_domainnet_lines_are_refused_naming_file_line_and_column(line, message, tmp_path):
    with pytest.raises(DataError, match=rf"Invalid data file {tmp_path}/sketch_train.txt: {message}"):
        load_data(f"domainnet:{_domainnet(tmp_path, line=line)}")


def _finetune(spec, out, *extra):
    return ["finetune", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--data", spec, "--method",
            "sgd-freeze-embed", "--lr", "0.01", "--epochs", "1", "--batch-size", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("case", ["waterbirds id_val", "waterbirds ood_test", "domainnet id_val"])
def test_an_empty_split_is_refused_before_any_work_by_the_run_and_the_dry_run(case, tmp_path, capsys):
    """Was: a traceback from the LR schedule or the data loader (or, for an empty test split, a result
    of 0/0 accuracy), with the output folder already made."""
    if case.startswith("waterbirds"):
        drop = 1 if case.endswith("id_val") else 2
        rows = [r for r in WATERBIRDS_ROWS if r[2] != drop or (drop == 2 and r[1] == r[3])]
        spec = f"waterbirds:{_waterbirds(tmp_path / 'data', rows=rows)}"
        expected = (rf"the {case.split()[1]} split has no images \(defined by {tmp_path}/data/metadata.csv "
                    rf"\(split {drop}\b")
    else:
        spec = f"domainnet:{_domainnet(tmp_path / 'data', n_train=9)}"  # 10% of 9 is none
        expected = rf"the id_val split has no images \(defined by {tmp_path}/data/sketch_train.txt \(a fixed 10%\)"
    with pytest.raises(DataError, match=expected):
        load_data(spec)
    for extra in ((), ("--dry-run",)):
        assert cli.main(_finetune(spec, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "split has no images" in err[0], err
        assert not (tmp_path / "out").exists()


def test_tables_integer_reads_integral_floats_only():
    from pathlib import Path

    from fused_ft.harness.data.tables import integer

    assert [integer(t, Path("f"), 1, "c", "L") for t in ("3", " 3 ", "3.0", "+3", "-0.0", "1e2")] == [3, 3, 3, 3, 0,
                                                                                                      100]
    for bad in ("3.5", "", "nan", "inf", "x"):
        with pytest.raises(DataError, match=rf"Invalid data file f: line 1, column c: {bad!r} is not an integer"):
            integer(bad, Path("f"), 1, "c", "L")
