"""The output-path checks every command runs before its work: a path that cannot be written
fails at once (exit status 8, naming it), and the check itself leaves nothing behind."""

from pathlib import Path

import pytest

from edge.errors import ConfigInvalidError, ExitStatus, check_output_file, check_output_folder


def test_a_file_can_be_written_in_a_folder_yet_to_be_made_and_nothing_is_made(tmp_path):
    out = tmp_path / "calibration" / "demo-vehicle" / "cam0.thresholds.json"
    assert check_output_file(str(out), "--out") == out
    assert check_output_folder(tmp_path / "runs" / "fold0") == tmp_path / "runs" / "fold0"
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_may_be_overwritten_and_is_left_as_it_was(tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("path,score\n")
    assert check_output_file(out) == out
    assert out.read_text() == "path,score\n"


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_named(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    cases = [
        (
            check_output_file,
            tmp_path,
            f"{tmp_path}: a folder, not a file (--out names the file to write)",
        ),
        (
            check_output_folder,
            taken,
            f"{taken}: a file, not a folder (--out names the folder to write into)",
        ),
        (
            check_output_file,
            taken / "x.json",
            f"{taken / 'x.json'}: cannot be written, {taken} is a file, not a folder",
        ),
    ]
    for check, path, message in cases:
        with pytest.raises(ConfigInvalidError) as refused:
            check(path, "--out")
        assert str(refused.value) == message
        assert refused.value.exit_status == ExitStatus.CONFIG_INVALID


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_folder_that_takes_no_file_is_refused_even_for_root():
    with pytest.raises(ConfigInvalidError) as refused:
        check_output_file("/proc/nope/x.onnx")
    # The reason after the colon is the system's: ENOENT for root, EACCES for anyone else.
    assert str(refused.value).startswith(
        "/proc/nope/x.onnx: cannot be written (no file can be made in /proc: "
    )
    assert not Path("/proc/nope").exists()
