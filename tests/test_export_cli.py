"""The export command's guards and the model card's wording (no training needed)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_model_card_says_whose_epochs_it_shows() -> None:
    from distill.exports.export import _epochs_note

    assert _epochs_note({"epochs": 3, "run_epochs": 10}) == " (the exported checkpoint's; the run trained 10)"
    assert _epochs_note({"epochs": 10, "run_epochs": 10}) == ""
    assert _epochs_note({"epochs": 3}) == ""


def test_export_refuses_a_folder_that_already_holds_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill.export import main as export_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"another export")
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files (model.onnx)" in err and "--overwrite" in err
    assert (out / "model.onnx").read_bytes() == b"another export"
