"""A write that fails for lack of space (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as on a
full disk): the job stops with one line naming the file, and neither that file nor its temporary
copy is left where a later step would read it. Run again with space, the job completes."""
from fault_helpers import assert_same_result, evaluate, faults, mambapeft, refused, train
from mambapeft.runspec import METRICS

LIMIT = 2048  # bytes: below every checkpoint, record and cache of the tiny run


def test_checkpoint_write_without_space(tiny, whole, tmp_path):
    with faults(file_size_limit=LIMIT):
        done = train(tiny, tmp_path)
    refused(done, "checkpoint.pt: cannot write it", "File too large", "free space")
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file
    assert train(tiny, tmp_path).returncode == 0 and evaluate(tiny, tmp_path).returncode == 0
    assert_same_result(tmp_path, whole)


def test_metrics_write_without_space(tiny, whole, tmp_path):
    assert train(tiny, tmp_path).returncode == 0
    before = sorted(tmp_path.iterdir())
    with faults(file_size_limit=LIMIT):
        done = evaluate(tiny, tmp_path)
    refused(done, f"{METRICS}: cannot write it", "File too large")
    assert sorted(tmp_path.iterdir()) == before  # no metrics.json for a table to read, no temporary file
    assert evaluate(tiny, tmp_path).returncode == 0
    assert_same_result(tmp_path, whole)


def test_image_cache_write_without_space(tiny, tmp_path):
    out = tmp_path / "test_32.npz"
    with faults(file_size_limit=LIMIT):
        done = mambapeft("data", "cache", "--root", tiny["data"]["root"], "--task", "digits", "--split", "test",
                         "--resolution", 32, "--out", out)
    refused(done, f"{out}: cannot write it", "File too large")
    assert list(tmp_path.iterdir()) == []
