"""Faults at the workflow level: a second Snakemake on a directory where one is running is told the
directory is locked (and the first finishes undisturbed); a config value of the wrong type, or an
unknown key, is refused in one line naming its key."""
import threading

from fault_helpers import faults, mambapeft
from workflow_helpers import TINY, snakemake

TARGET = "resources/data/vtab/manifest.json"  # one quick job: the mini VTAB data


def test_second_snakemake_on_a_running_directory_is_told_it_is_locked(tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    first = []
    with faults(hold_write=f"manifest.json:{hold}"):  # the first one's job waits before its output
        running = threading.Thread(target=lambda: first.append(
            snakemake(TARGET, "-c", "1", "--configfile", TINY, cwd=workdir, check=False)))
        running.start()
        try:
            while not (hold / "held").exists() and running.is_alive():
                running.join(0.05)
            assert (hold / "held").exists(), first[0].stderr[-3000:] if first else "the first Snakemake did not start"
            second = snakemake(TARGET, "-c", "1", "--configfile", TINY, cwd=workdir, check=False)
        finally:
            (hold / "release").touch()
            running.join(600)
    assert second.returncode != 0 and "Directory cannot be locked" in second.stdout + second.stderr
    assert first[0].returncode == 0, first[0].stderr[-3000:]
    assert (workdir / TARGET).is_file()


def test_config_value_of_the_wrong_type_names_its_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(TINY.read_text().replace("threads: 1\n", "threads: one\n"))
    done = mambapeft("train", "--config", config, "--experiment", "vtab", "--backbone", "vim-mini", "--task", "digits",
                     "--method", "lorap_x", "--dry-run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("mambapeft: error: threads: 'one' is not of type 'integer'")
    assert len(done.stderr.splitlines()) == 1


def test_an_unknown_config_key_fails_the_dry_run_in_one_line_naming_it(tmp_path):
    """Not Snakemake's own schema validation, which prints the whole schema and config after its message."""
    done = snakemake("-n", "--configfile", TINY, "--config", "foo=1", cwd=tmp_path, check=False)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and len(output) < 5, "\n".join(output[:20])
    assert output[-1].startswith("Invalid configuration: top level: unknown key(s) ['foo']; valid keys: ")
