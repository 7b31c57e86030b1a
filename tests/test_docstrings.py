"""The public loader classes say what they load and when, and their examples run."""

from __future__ import annotations

import doctest
import importlib

import pytest

#: (module, class): the classes a user constructs to load something.
LOADERS = [
    ("nodule_edge.runtime.bundle", "Bundle"),
    ("nodule_edge.runtime.inferer", "NoduleInferer"),
    ("nodule_edge.runtime.engines.base", "Engine"),
    ("nodule_edge.runtime.dicom.series", "DicomSeries"),
    ("nodule_edge.runtime.study", "Study"),
    ("nodule_edge.index.store", "AttributeIndex"),
    ("nodule_edge.patch", "PatchSpec"),
]


@pytest.mark.parametrize(("module", "name"), LOADERS)
def test_loader_docstring_has_an_example_that_runs(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    cls = getattr(mod, name)
    doc = cls.__doc__ or ""
    assert "Example" in doc and ">>>" in doc, f"{module}.{name} shows no example"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(cls, name, module=mod, globs=vars(mod).copy()):
        runner.run(test)
    assert runner.failures == 0, f"{module}.{name}: {runner.failures} failing example(s)"
