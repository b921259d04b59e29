"""extract.refs.json reads the checkpoint's bytes whatever the checkpoint and run directory are called.

fsspec renders "{{...}}" in a reference set as template syntax, and reads "::" and "%" in a
path given to it as URL syntax; a checkpoint directory and a run directory named with those
(and spaces, non-ASCII letters) must convert, and every array read through the reference set
(stores.open_with_refs, as the README shows) must equal the stages' own reading of it.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import convert

ODD_NAME = "ck {{x}} {{store}} 100%41 ü a::b"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    root = tmp_path_factory.mktemp("paths")
    plain = write_bitnet_checkpoint(root / "plain")
    model = root / ODD_NAME
    shutil.copytree(plain, model)
    out, work = root / f"out {{{{y}}}} %25 ü::z.gguf", root / f"work {{{{w}}}} %2F é::w"
    convert(model, out, "--workdir", work, "--model-name", "m")  # general.name as a plain name's
    return model, out, work


def test_every_array_reads_the_same_through_the_reference_set(converted):
    from pipeline.stores import open_store, open_with_refs, read_rows

    _, _, work = converted
    store = work / "extract.zarr"
    stages_view, refs_view = open_store(store, "r"), open_with_refs(store)
    names = sorted(stages_view.array_keys())
    assert names and sorted(refs_view.array_keys()) == names
    indexed = 0
    for name in names:
        arr = stages_view[name]
        indexed += "source_ref" in arr.attrs
        expected = np.asarray(read_rows(arr, 0, arr.shape[0]))
        seen = np.asarray(refs_view[name][:])
        assert seen.tobytes() == expected.tobytes(), f"{name}: the reference set reads other bytes"
    assert indexed, "no array indexes the checkpoint: the test would not read through a checkpoint path"


def test_the_odd_names_convert_to_the_same_file(converted, tmp_path):
    model, out, _ = converted
    plain = tmp_path / "plain.gguf"
    convert(model.with_name("plain"), plain, "--model-name", "m")
    assert out.read_bytes() == plain.read_bytes()
