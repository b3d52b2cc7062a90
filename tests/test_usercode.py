"""Code the user names (curvlab/usercode.py) and own data (curvlab/io/data/user.py), in-process."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from curvlab.errors import CurvlabError, DataError, ModelError
from curvlab.io.data import Dataset, load_dataset, load_factory_data
from curvlab.models import build_from_config
from curvlab.usercode import (
    FactoryWarning,
    check_recorded,
    is_data_factory_spec,
    is_factory_spec,
    load_factory,
    printable,
    require_named,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nets.py:build", True), ("/abs/dir/nets.py:Nets.build", True), ("mypkg.nets:build", True),
        ("shutil:rmtree", True), ("resnet8", False), ("nets.py", False), ("nets.py:", False),
        (":build", False), ("nets-1.txt:build", False), ("nets.py:build()", False), ("a b:c", False),
        (None, False), (3, False),
    ],
)
def test_factory_spec_form(text, expected):
    assert is_factory_spec(text) is expected


def test_data_sources_are_not_factories():
    for spec in ("npz:x.npz", "text:notes.py", "cifar10:data", "digits", "pystdlib"):
        assert not is_data_factory_spec(spec)
    assert is_data_factory_spec("mydata.py:load") and is_data_factory_spec("pkg.data:load")


def test_file_runs_once_per_content_with_its_folder_on_the_path(tmp_path):
    (tmp_path / "helper_mod_c13.py").write_text("VALUE = 7\n")
    nets = tmp_path / "nets.py"
    nets.write_text("import helper_mod_c13\nCOUNT = [0]\nCOUNT[0] += 1\n"
                    "def build(k=1):\n    import helper_mod_c13 as h\n    return h.VALUE * k\n")
    before = list(sys.path)
    first = load_factory(f"{nets}:build")
    again = load_factory(f"{nets}:build")
    assert first.function.__globals__["COUNT"] == [1] and again.function is first.function
    assert first.call({"k": 2}) == 14  # the neighbour is importable while the factory runs, too
    assert sys.path == before
    assert first.file == str(nets) and len(first.sha256) == 64
    nets.write_text(nets.read_text() + "# changed\n")
    assert load_factory(f"{nets}:build").sha256 != first.sha256


def test_failures_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_factory(f"{tmp_path / 'nope.py'}:build", error=ModelError)
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\nraise RuntimeError('at import')\n")
    with pytest.raises(CurvlabError, match=rf"executing .*bad.py raised RuntimeError: at import \({bad}:2\)"):
        load_factory(f"{bad}:build")
    with pytest.raises(CurvlabError, match="cannot import no_such_package_c13.nets: ModuleNotFoundError"):
        load_factory("no_such_package_c13.nets:build")
    ok = tmp_path / "ok.py"
    ok.write_text("X = 3\ndef build(a, *, b=2):\n    return a + b\n")
    with pytest.raises(CurvlabError, match="has no 'missing'"):
        load_factory(f"{ok}:missing")
    with pytest.raises(CurvlabError, match="'X' is a int, not a function"):
        load_factory(f"{ok}:X")
    factory = load_factory(f"{ok}:build")
    with pytest.raises(CurvlabError, match=r"missing a required argument: 'a' \(its parameters: a, b\)"):
        factory.call({})
    assert factory.call({"a": 1}, {"b": 5, "c": 9}) == 6  # offered values go to parameters it has only
    assert factory.call({"a": 1, "b": 1}, {"b": 5}) == 2  # given arguments win over offered ones


def test_require_named_and_printable():
    require_named("x.py:f", "x.py:f", "ckpt.h5")  # named: nothing to say
    with pytest.raises(CurvlabError) as info:
        require_named("/tmp/\x1b[2Jevil.py:f", None, "ckpt.h5", args={"path": "/", "n": [1, 2]})
    message = str(info.value)
    assert "\x1b" not in message and "\\x1b[2Jevil.py:f" in message
    assert "--model-arg path=/ --model-arg 'n=[1, 2]'" in message
    assert printable("a\nb\tc") == "a\\nb\\tc"


def test_check_recorded(tmp_path):
    nets = tmp_path / "n.py"
    nets.write_text("def build(width=2):\n    return width\n")
    factory = load_factory(f"{nets}:build")
    record = {**factory.record(), "args": {"width": 3}}
    with pytest.raises(CurvlabError, match='called with arguments {"width": 3}; pass them too'):
        check_recorded(factory, {}, record, "x.h5", args_given=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_recorded(factory, {"width": 3}, record, "x.h5", args_given=True)  # same: silent
    with pytest.warns(FactoryWarning, match=r'\{"width": 3\} there, with \{"width": 4\} now'):
        check_recorded(factory, {"width": 4}, record, "x.h5", args_given=True)
    with pytest.warns(FactoryWarning, match="has changed since it was recorded"):
        check_recorded(factory, {"width": 3}, {**record, "factory_sha256": "0" * 64}, "x.h5", args_given=True)


def test_library_entry_points_refuse_recorded_factories():
    with pytest.raises(ModelError, match="names the factory 'shutil:rmtree'"):
        build_from_config({"factory": "shutil:rmtree", "args": {"path": "/"}})
    with pytest.raises(ModelError, match="unknown model"):
        build_from_config({"name": "shutil:rmtree", "input_shape": [1], "num_classes": 2})
    with pytest.raises(DataError, match="a data factory"):
        load_dataset("shutil:rmtree")


# --------------------------------------------------------------------------- own data


def _data_file(tmp_path, body: str) -> str:
    path = tmp_path / f"d{abs(hash(body))}.py"
    header = "import numpy as np\nimport torch\nfrom torch.utils.data import Dataset, IterableDataset\n"
    path.write_text(header + body)
    return f"{path}:load"


def test_own_data_forms(tmp_path):
    pairs = _data_file(tmp_path, "def load(split='train'):\n"
                                 "    n = 10 if split == 'train' else 4\n"
                                 "    x = np.arange(n * 3, dtype=np.float64).reshape(n, 3)\n"
                                 "    return x, np.arange(n) % 3\n")
    data = load_factory_data(pairs)
    assert isinstance(data, Dataset) and data.x.dtype == torch.float64 and data.y.dtype == torch.int64
    assert len(data) == 10 and data.num_classes == 3 and data.input_shape == (3,) and data.name == pairs
    assert len(load_factory_data(pairs, split="test")) == 4
    assert len(load_factory_data(pairs, limit=6)) == 6
    mapping = _data_file(tmp_path, "class D(Dataset):\n    num_classes = 5\n    def __len__(self):\n"
                                   "        return 7\n    def __getitem__(self, i):\n"
                                   "        return torch.full((2, 2), float(i)), i % 2\n"
                                   "def load():\n    return D()\n")
    data = load_factory_data(mapping, limit=5)
    assert data.x.shape == (5, 2, 2) and data.x.dtype == torch.float32 and data.num_classes == 5
    assert data.y.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(DataError, match="no 'split' parameter, so it has no test split"):
        load_factory_data(mapping, split="test")
    stream = _data_file(tmp_path, "class S(IterableDataset):\n    def __iter__(self):\n        i = 0\n"
                                  "        while True:\n            yield torch.tensor([i, i + 1]), i % 4\n"
                                  "            i += 1\ndef load():\n    return S()\n")
    assert len(load_factory_data(stream, limit=9)) == 9
    with pytest.raises(DataError, match="without a length: give --examples"):
        load_factory_data(stream)
    tokens = _data_file(tmp_path, "def load():\n    x = torch.randint(0, 6, (8, 5), dtype=torch.int32)\n"
                                  "    return {'x': x, 'y': x.roll(-1, 1), 'num_classes': 6}\n")
    data = load_factory_data(tokens)
    assert data.x.dtype == torch.int64 and data.num_classes == 6 and data.input_shape == (5,)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return np.full((3, 2), np.nan), np.zeros(3, int)", "NaN or infinite"),
        ("return np.zeros((3, 2)), np.zeros(3)", "expected integer class labels"),
        ("return np.zeros((3, 2)), -np.ones(3, int)", "negative label"),
        ("return np.zeros((3, 2)), np.zeros(4, int)", "x has 3 examples but y has shape (4,)"),
        ("return {'x': np.zeros((3, 2))}", "no 'y'"),
        ("return {'x': np.zeros((3, 2)), 'y': np.ones(3, int), 'num_classes': 1}",
         "above the largest label 1"),
        ("return [1, 2, 3]", "expected a torch.utils.data.Dataset"),
        ("return np.zeros((0, 2)), np.zeros(0, int)", "holds no examples"),
        ("return np.array(['a', 'b']), np.zeros(2, int)", "dtype"),
        ("raise KeyError('gone')", "the factory raised KeyError: 'gone'"),
    ],
)
def test_own_data_errors(tmp_path, body, message):
    spec = _data_file(tmp_path, f"def load():\n    {body}\n")
    with pytest.raises(DataError, match=None) as info:
        load_factory_data(spec)
    assert message in str(info.value) and str(info.value).startswith(f"--data {spec}: ")
    assert "\n" not in str(info.value)


def test_own_data_items_must_match(tmp_path):
    spec = _data_file(tmp_path, "class D(Dataset):\n    def __len__(self):\n        return 3\n"
                                "    def __getitem__(self, i):\n        return torch.zeros(i + 1), 0\n"
                                "def load():\n    return D()\n")
    with pytest.raises(DataError, match=r"item 1 has shapes x \(2,\)"):
        load_factory_data(spec)
    spec = _data_file(tmp_path, "class D(Dataset):\n    def __len__(self):\n        return 3\n"
                                "    def __getitem__(self, i):\n        return torch.zeros(2)\n"
                                "def load():\n    return D()\n")
    with pytest.raises(DataError, match="item 0 is a Tensor, not an"):
        load_factory_data(spec)
